"""Edge<->cloud contracts shared by agent and broker: topics, record batches, commands."""
