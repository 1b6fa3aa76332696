"""Edge agent: the composition root that wires drivers, the durable queue and the uplink."""
