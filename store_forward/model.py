"""The queue's vocabulary: record and batch types, the `Queue` contract, and the store's typed errors.

Contract shared by every implementation (SQLite, memory, and the async facade in front of them):

- Every record gets `(generation, seq)`. `generation` is a random id chosen once when the store is
  created; `seq` grows by one per appended record and is never handed out twice by one generation,
  even after the rows with the highest seq were deleted and the process restarted. Together they are
  the end-to-end idempotency key: the cloud drops duplicates and detects gaps with them.
- `append` returns the seqs only after the records are durable (for SQLite: the transaction committed).
- `lease` hands out up to `max_items` records, lowest `Priority` value first and oldest-first (by seq)
  within a priority, skipping records held by a lease that has not expired yet. Leases live in memory
  only: after a restart every unsettled record can be leased again (at-least-once delivery).
- `settle` deletes acked and rejected records durably (rejected ones are counted apart) and releases
  the batch's other records for the next lease.
- Lanes: a record is *live* while its enqueue time is within `live_window_s` of the store clock, else it
  is *backlog*. `lease(lane=LIVE)` serves only live records, `lease(lane=BACKLOG)` only backlog records
  (and marks the batch `historical`), `lease(lane=ANY)` both; each in drain order. The facade's
  `lease_next` combines them: live first, then backlog within a byte-rate budget.
- Gaps: whatever the store drops without delivering (eviction by policy, rows lost to corruption) is
  recorded durably, in the same transaction as the delete, as `Gap` ranges; `pending_gaps` lists them
  until `settle_gap` says they were announced upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from store_forward.policy import QueueBounds


class Priority(IntEnum):
    """Drain order: a lower value is leased first; within one priority records drain oldest-first."""

    ALARM = 0
    EVENT = 1
    CARD = 2
    TELEMETRY = 3
    BULK = 4


PRIORITY_COUNT = len(Priority)
DEFAULT_LIVE_WINDOW_S = 60.0


class Lane(StrEnum):
    """Which records a lease may take: live (recent), backlog (older: delivered as historical), or any."""

    ANY = "any"
    LIVE = "live"
    BACKLOG = "backlog"


class GapReason(StrEnum):
    """Why seqs will never be delivered: dropped on purpose by the bounds policy, or lost to damage."""

    EVICTED = "evicted"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Gap:
    """`count` records of `priority` (None: unknown, e.g. unreadable rows) with seqs in
    `first_seq..last_seq` (inclusive) of `generation` were dropped and will never be delivered.

    Seqs are global across priorities, so the range may also hold records of other priorities or of the
    same priority that were kept (thinning drops every other one): the cloud should expect exactly
    `count` of its missing seqs in the range to be explained by this gap. `detail` names the bound that
    caused it (`max_records`, `max_bytes`, `max_age`, `disk_floor`, `disk_full`) or the damage found."""

    gap_id: int
    generation: str
    first_seq: int
    last_seq: int
    priority: Priority | None
    reason: GapReason
    detail: str
    count: int
    recorded_ns: int


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A record the pipeline wants stored; `ts_ns` is its data time (UTC epoch ns)."""

    kind: str
    payload: bytes
    ts_ns: int
    priority: Priority = Priority.TELEMETRY


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A committed record. `attempts` counts the leases that handed it out since this store was opened,
    including the lease that returned it (1 on first delivery); it restarts at 1 after a reopen."""

    generation: str
    seq: int
    kind: str
    payload: bytes
    ts_ns: int
    priority: Priority
    enqueued_ns: int
    attempts: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Records held by one lease until `expires_s` (the caller's monotonic clock, as passed to `lease`).

    An empty batch (nothing leaseable) has `lease_id == 0` and may be settled as a no-op."""

    lease_id: int
    records: tuple[StoredRecord, ...]
    generation: str
    expires_s: float
    historical: bool = False  # backlog records (older than the live window): the cloud must not treat
    # them as current values (no live alarms from them), only as history to fill in.

    @property
    def seqs(self) -> tuple[int, ...]:
        return tuple(r.seq for r in self.records)

    @property
    def payload_bytes(self) -> int:
        return sum(len(r.payload) for r in self.records)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of the queue.

    `oldest_ts_ns` is the data time of the record waiting longest (lowest seq), None when empty.
    `leased` counts records held by leases that were neither settled nor expired (expiry judged at the
    latest `now_s` the queue saw). Totals count since the store was created (SQLite) or opened (memory).
    `appended_bytes_total` is the payload bytes ever appended: a cheap proxy for flash wear.
    `evicted_total` counts records deleted by `evict` (bounds), not delivered: gaps the cloud will see.
    `gaps_pending` counts `Gap` rows not yet settled (announced upstream).
    Flash wear, since this instance opened the store: `written_bytes` is what reached the storage layer
    (`written_source` "proc": /proc/self/io write_bytes of this process; "files": growth of the DB and
    WAL files, a lower bound; "none": not measured, e.g. memory), `write_amplification` is that divided
    by the payload bytes appended since opening (None until something was appended), and
    `written_bytes_per_hour` extrapolates the rate since opening."""

    generation: str
    depth: int
    bytes: int
    oldest_ts_ns: int | None
    next_seq: int
    leased: int
    appended_total: int
    settled_total: int
    acked_total: int
    rejected_total: int
    depth_by_priority: tuple[int, ...]
    appended_bytes_total: int
    evicted_total: int
    gaps_pending: int = 0
    written_bytes: int = 0
    written_source: str = "none"
    write_amplification: float | None = None
    written_bytes_per_hour: float | None = None


class Queue(Protocol):
    """The synchronous, deterministic queue; the event loop reaches it through `facade.AsyncQueue`."""

    def append(self, records: Sequence[NewRecord], *,
               before_commit: Callable[[], None] | None = None) -> list[int]:
        """Store records durably and return their seqs. `before_commit`, if given, is called once the
        records are written and only the commit is left (for SQLite: inside the transaction, just
        before COMMIT); it must not raise. The facade uses it to acknowledge the previous group commit
        while this one's fsync runs."""
        ...

    def lease(self, max_items: int, now_s: float, *, max_bytes: int | None = None,
              lease_s: float = 60.0, lane: Lane = Lane.ANY,
              live_window_s: float = DEFAULT_LIVE_WINDOW_S) -> Batch: ...

    def settle(self, batch: Batch, acked: Iterable[int], rejected: Iterable[int] = ()) -> None: ...

    def stats(self) -> QueueStats: ...

    def evict(self, bounds: QueueBounds, now_s: float, *, free_bytes: int = 0) -> int:
        """Delete records (see `policy.plan_eviction`) until the queue fits bounds, plus `free_bytes` of
        payload when the disk is full; record them as gaps in the same step; returns how many."""
        ...

    def pending_gaps(self, limit: int = 100) -> list[Gap]:
        """Unsettled gaps, oldest first."""
        ...

    def settle_gap(self, gap_id: int) -> None:
        """The gap was announced upstream: forget it durably. Unknown ids are ignored (idempotent)."""
        ...

    def checkpoint(self) -> None:
        """Housekeeping hint from an idle writer (SQLite: a PASSIVE WAL checkpoint); may do nothing."""
        ...

    def close(self) -> None: ...


class StoreError(Exception):
    """Base of the store's errors; subclasses say what the caller should do."""


class StoreCorrupt(StoreError):
    """The database is unreadable, damaged, foreign or from a newer schema: stop and salvage or replace
    it (operator action); retrying will not help."""


class StoreForeign(StoreCorrupt):
    """The file is not a fieldgate queue, or is from a newer schema: a configuration or upgrade problem,
    not damage. Never salvaged automatically (it may be someone else's data); fix the path or upgrade."""


class StoreBusy(StoreError):
    """Another process holds the store for writing: stop this one (two writers would break seq order)."""


class StoreFull(StoreError):
    """The disk (or the database size limit) is full; the append was NOT stored. Retry after the
    backlog drains or evict by policy."""


class StoreIOError(StoreError):
    """The operating system failed a read or write; the operation did not take effect. Retry, and stop
    if it persists (failing flash)."""


class StoreClosed(StoreError):
    """The queue was closed; the operation did not take effect."""


def validate_new_records(records: Sequence[NewRecord]) -> None:
    """Reject malformed records before they reach a transaction (one bad record must not fail a group
    commit that merges other callers' records)."""
    # Fast path (exact types, checked in one expression per record): this runs for every record the
    # agent stores, so it must cost far less than the insert itself. Anything unusual (subclasses,
    # bools, out-of-range times) takes the slow path below, which names the first bad field.
    for r in records:
        if not (type(r) is NewRecord and type(r.kind) is str and r.kind and type(r.payload) is bytes
                and type(r.ts_ns) is int and -(2**63) <= r.ts_ns < 2**63 and type(r.priority) is Priority):
            break
    else:
        return
    for i, r in enumerate(records):
        if not isinstance(r, NewRecord):
            raise TypeError(f"records[{i}]: expected NewRecord, got {type(r).__name__}")
        if not isinstance(r.kind, str) or not r.kind:
            raise ValueError(f"records[{i}].kind: must be a non-empty str")
        if not isinstance(r.payload, bytes):
            raise TypeError(f"records[{i}].payload: must be bytes, got {type(r.payload).__name__}")
        if not isinstance(r.ts_ns, int) or isinstance(r.ts_ns, bool) or not -(2**63) <= r.ts_ns < 2**63:
            raise ValueError(f"records[{i}].ts_ns: must be an int64 of UTC epoch nanoseconds")
        if not isinstance(r.priority, Priority):
            raise TypeError(f"records[{i}].priority: must be a Priority, got {r.priority!r}")


def validate_lease_args(max_items: int, max_bytes: int | None, lease_s: float,
                        lane: Lane = Lane.ANY, live_window_s: float = DEFAULT_LIVE_WINDOW_S) -> None:
    if max_items < 0:
        raise ValueError("max_items must be >= 0")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError("max_bytes must be >= 0 or None")
    if not lease_s > 0:
        raise ValueError("lease_s must be > 0")
    if not isinstance(lane, Lane):
        raise TypeError(f"lane must be a Lane, got {lane!r}")
    if not live_window_s >= 0:
        raise ValueError("live_window_s must be >= 0")
