"""EMQX-compatible MQTT file transfer on the broker: `$file/` commands, fragments, assembly, export."""
