"""Bounds on the queue and which records to evict to stay inside them (pure: decides, does not delete).

Theory of operation. A wellsite box can be offline for weeks; without a bound the queue grows until
the flash is full and then every append fails (the peers' most common complaint). `QueueBounds` caps
records, payload bytes and age. When the queue is over a bound, `plan_eviction` picks victims lane by
lane from the least important priority (BULK) towards the most important, oldest first within a lane,
until the queue is back inside every bound. Lanes in `protected` are never evicted (by default ALARM:
an alarm is worth more than the disk space it takes), and records under an unexpired lease are skipped
(they are on the wire; their settle decides their fate). Eviction is accounted apart from acks and
rejections (`evicted_total`) so the cloud-side gap it leaves in the seq series is explainable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from store_forward.model import Priority


@dataclass(frozen=True, slots=True)
class QueueBounds:
    """Limits on the stored backlog; None means unbounded on that axis."""

    max_records: int | None = None
    max_bytes: int | None = None
    max_age_s: float | None = None
    protected: frozenset[Priority] = field(default_factory=lambda: frozenset({Priority.ALARM}))

    def __post_init__(self) -> None:
        if self.max_records is not None and self.max_records < 0:
            raise ValueError("max_records must be >= 0 or None")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 or None")
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ValueError("max_age_s must be > 0 or None")

    def eviction_order(self) -> list[Priority]:
        return [p for p in sorted(Priority, reverse=True) if p not in self.protected]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One stored record as eviction sees it."""

    seq: int
    priority: Priority
    size_bytes: int
    enqueued_ns: int
    leased: bool


def plan_eviction(lanes: Iterable[Iterable[Candidate]], *, depth: int, size_bytes: int, now_ns: int,
                  bounds: QueueBounds) -> list[int]:
    """Seqs to delete so the queue fits `bounds`.

    `lanes` yields one iterable per priority in `bounds.eviction_order()`, each oldest first; they are
    consumed lazily and abandoned as soon as nothing more in them can be selected. `depth`/`size_bytes`
    describe the whole queue. Records older than `max_age_s` (by enqueue time) are evicted whatever
    the counts; if the protected lanes alone exceed the bounds, the plan evicts every unprotected,
    unleased record and the queue stays over its bound."""
    max_age_ns = None if bounds.max_age_s is None else int(bounds.max_age_s * 1e9)
    victims: list[int] = []
    for lane in lanes:
        for c in lane:
            over_count = bounds.max_records is not None and depth > bounds.max_records
            over_bytes = bounds.max_bytes is not None and size_bytes > bounds.max_bytes
            too_old = max_age_ns is not None and now_ns - c.enqueued_ns > max_age_ns
            if not (over_count or over_bytes or too_old):
                break  # the rest of this lane is newer and the counts fit: try the next lane for age
            if c.leased or c.priority in bounds.protected:
                continue
            victims.append(c.seq)
            depth -= 1
            size_bytes -= c.size_bytes
    return victims
