"""The edge-to-cloud link: sans-I/O MQTT, shared schemas, transports and link policy."""
