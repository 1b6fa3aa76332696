"""OPC UA acquisition: typed config, pure status mapping, one asyncua adapter and the driver on top."""
