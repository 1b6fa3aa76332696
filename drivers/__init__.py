"""Southbound acquisition: base value types, scheduling, one sub-package per bus."""
