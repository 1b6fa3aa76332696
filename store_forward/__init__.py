"""Durable store-and-forward queue (SQLite WAL) with the same contract in memory."""
