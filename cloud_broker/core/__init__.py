"""Pure broker core: sessions, routing, retained messages. No I/O."""
