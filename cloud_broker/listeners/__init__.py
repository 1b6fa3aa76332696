"""Network listeners that feed bytes into the pure broker core."""
