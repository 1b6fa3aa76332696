"""Durable storage of the broker core's state: the SQLite store and the group-committing writer thread."""
