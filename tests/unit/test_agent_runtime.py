"""agent.runtime.settle_gc: start-up objects frozen out of the collector, and released again on reload."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from agent.runtime import GC_OLDER_THRESHOLDS, GC_YOUNG_THRESHOLD, settle_gc


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


def test_settle_gc_freezes_what_exists_and_spaces_young_collections_out() -> None:
    survivor = _Node()
    settle_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *GC_OLDER_THRESHOLDS)
    assert gc.get_freeze_count() > 0
    assert all(obj is not survivor for gen in range(3) for obj in gc.get_objects(generation=gen))


def test_a_cycle_frozen_at_start_up_is_collected_after_the_next_settle() -> None:
    # A config reload replaces drivers whose objects form cycles: they must not stay frozen forever.
    node = _Node()
    ref = weakref.ref(node)
    settle_gc()
    del node
    gc.collect()
    assert ref() is not None  # frozen: even a full collection leaves it alone
    settle_gc()  # what a reload calls: unfreeze, collect, freeze again
    assert ref() is None
