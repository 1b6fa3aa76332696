"""The paired cloud broker: pure core, listeners, persistence, file transfer, rules."""
