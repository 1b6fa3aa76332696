"""Sans-I/O MQTT 3.1.1 and 5.0: codec, topic rules, client session. No sockets, clocks or asyncio."""
