"""Process-level tuning of the agent's Python runtime: how the cyclic garbage collector treats it.

The agent makes most of its long-lived objects at start-up (config, drivers, read plans, compiled
decoders) and then allocates short-lived ones at a steady rate (readings, records, futures). With
CPython's defaults a young-generation collection runs every 700 container allocations and the full
collections walk every start-up object again. `settle_gc()` collects once, freezes what exists
(`gc.freeze`: never traversed again) and collects the young generation every 20,000 allocations.
Measured with `edge-hil bench fleet` (default run, six alternating pairs): 8-11 % less agent CPU per
value, same peak RSS. It is called again after every configuration change: objects frozen earlier
are unfrozen first, so the parts a reload replaced can still be collected.
"""

from __future__ import annotations

import gc

GC_YOUNG_THRESHOLD = 20_000  # container allocations between young-generation collections (CPython: 700)
GC_OLDER_THRESHOLDS = (20, 20)  # collections of the generation below that trigger the next (CPython: 10, 10)


def settle_gc() -> None:
    """Collect, freeze the survivors out of future collections, and space young collections out."""
    gc.unfreeze()  # what a previous call froze becomes collectable again (a reload may have dropped it)
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *GC_OLDER_THRESHOLDS)
