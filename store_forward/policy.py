"""Bounds on the queue, which records to evict to stay inside them, and the backlog lane's byte budget
(pure: decides, does not delete; time is passed in).

Theory of operation. A wellsite box can be offline for weeks; without a bound the queue grows until
the flash is full and then every append fails (the peers' most common complaint). `QueueBounds` caps
records, payload bytes and age, and keeps a floor of free disk space. When the queue is over a bound,
`plan_eviction` picks victims lane by lane from the least important priority (BULK) towards the most
important, until the queue is back inside every bound. Within a lane the mode decides: *drop oldest*
(the default) takes records oldest first; *thin* (`QueueBounds.thin`) takes every other record, oldest
first, and passes over the lane again (halving it each time) only while still over the bound, so a
thinned telemetry history keeps its shape at a coarser resolution instead of losing its start.
Lanes in `protected` are never evicted (by default ALARM: an alarm is worth more than the disk space it
takes), and records under an unexpired lease are skipped (they are on the wire; their settle decides
their fate). Records older than `max_age_s` are dropped whatever the lane mode. Every victim carries the
bound that selected it, so the store can record each eviction as an explicit gap ("evicted by policy").

The disk floor is turned into a byte deficit by the caller (`disk_deficit_bytes`): the free space of
the file system plus the database's own free pages, below the floor. Deleting rows does not shrink the
file, it frees pages that the next appends reuse, so evicting the deficit stops the growth; counting the
free pages keeps the next call from evicting the same deficit again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from store_forward.model import DEFAULT_LIVE_WINDOW_S, Priority

# Causes recorded in `Gap.detail` for policy evictions.
CAUSE_MAX_AGE = "max_age"
CAUSE_MAX_RECORDS = "max_records"
CAUSE_MAX_BYTES = "max_bytes"
CAUSE_DISK_FLOOR = "disk_floor"
CAUSE_DISK_FULL = "disk_full"


@dataclass(frozen=True, slots=True)
class QueueBounds:
    """Limits on the stored backlog; None means unbounded on that axis.

    `min_free_disk_bytes` is the free-disk floor (statvfs of the store's file system, plus the store's
    own free pages); `thin` lists the priorities evicted by thinning instead of oldest-first; `protected`
    lists the priorities never evicted (alarms by default: configure `protected=frozenset()` to allow)."""

    max_records: int | None = None
    max_bytes: int | None = None
    max_age_s: float | None = None
    min_free_disk_bytes: int | None = None
    protected: frozenset[Priority] = field(default_factory=lambda: frozenset({Priority.ALARM}))
    thin: frozenset[Priority] = frozenset()

    def __post_init__(self) -> None:
        if self.max_records is not None and self.max_records < 0:
            raise ValueError("max_records must be >= 0 or None")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 or None")
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ValueError("max_age_s must be > 0 or None")
        if self.min_free_disk_bytes is not None and self.min_free_disk_bytes < 0:
            raise ValueError("min_free_disk_bytes must be >= 0 or None")
        for name in ("protected", "thin"):
            for p in getattr(self, name):
                if not isinstance(p, Priority):
                    raise TypeError(f"{name}: expected Priority members, got {p!r}")

    @property
    def unbounded(self) -> bool:
        return (self.max_records is None and self.max_bytes is None and self.max_age_s is None
                and self.min_free_disk_bytes is None)

    def eviction_order(self) -> list[Priority]:
        return [p for p in sorted(Priority, reverse=True) if p not in self.protected]


def disk_deficit_bytes(bounds: QueueBounds, *, fs_free_bytes: int, db_free_bytes: int) -> int:
    """Payload bytes to evict so that free disk (file system + the store's free pages) meets the floor."""
    if bounds.min_free_disk_bytes is None:
        return 0
    return max(0, bounds.min_free_disk_bytes - fs_free_bytes - db_free_bytes)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One stored record as eviction sees it."""

    seq: int
    priority: Priority
    size_bytes: int
    enqueued_ns: int
    leased: bool


@dataclass(frozen=True, slots=True)
class Victim:
    """A record selected for eviction and the bound that selected it (one of the CAUSE_* names)."""

    seq: int
    priority: Priority
    size_bytes: int
    cause: str


class _Need:
    """How far over its bounds the queue still is, shrinking as victims are chosen."""

    def __init__(self, bounds: QueueBounds, depth: int, size_bytes: int, deficit_bytes: int,
                 deficit_cause: str) -> None:
        self.bounds = bounds
        self.depth = depth
        self.size_bytes = size_bytes
        self.deficit_bytes = deficit_bytes
        self.deficit_cause = deficit_cause

    def cause(self) -> str | None:
        """The first bound still broken, or None when the queue fits."""
        b = self.bounds
        if b.max_records is not None and self.depth > b.max_records:
            return CAUSE_MAX_RECORDS
        if b.max_bytes is not None and self.size_bytes > b.max_bytes:
            return CAUSE_MAX_BYTES
        if self.deficit_bytes > 0:
            return self.deficit_cause
        return None

    def take(self, c: Candidate) -> None:
        self.depth -= 1
        self.size_bytes -= c.size_bytes
        self.deficit_bytes -= c.size_bytes


def plan_eviction(lanes: Iterable[Iterable[Candidate]], *, depth: int, size_bytes: int, now_ns: int,
                  bounds: QueueBounds, deficit_bytes: int = 0,
                  deficit_cause: str = CAUSE_DISK_FLOOR) -> list[Victim]:
    """Records to delete so the queue fits `bounds`, in the order chosen.

    `lanes` yields one iterable per priority in `bounds.eviction_order()`, each oldest first; drop-oldest
    lanes are consumed lazily and abandoned as soon as nothing more in them can be selected (thin lanes
    are read whole). `depth`/`size_bytes` describe the whole queue; `deficit_bytes` is the disk floor's
    shortfall (`disk_deficit_bytes`) or what a full disk needs freed (`deficit_cause=CAUSE_DISK_FULL`).
    If the protected lanes alone exceed the bounds, the plan evicts every unprotected, unleased record
    and the queue stays over its bound."""
    max_age_ns = None if bounds.max_age_s is None else int(bounds.max_age_s * 1e9)
    need = _Need(bounds, depth, size_bytes, deficit_bytes, deficit_cause)
    victims: list[Victim] = []

    def too_old(c: Candidate) -> bool:
        return max_age_ns is not None and now_ns - c.enqueued_ns > max_age_ns

    for lane in lanes:
        it = iter(lane)
        first = next(it, None)
        if first is None:
            continue
        if first.priority in bounds.protected:
            continue
        if first.priority in bounds.thin:
            victims.extend(_thin(_chain1(first, it), need, too_old))
            continue
        for c in _chain1(first, it):
            cause = CAUSE_MAX_AGE if too_old(c) else need.cause()
            if cause is None:
                break  # the rest of this lane is newer and the counts fit: try the next lane for age
            if c.leased:
                continue
            victims.append(Victim(c.seq, c.priority, c.size_bytes, cause))
            need.take(c)
    return victims


def _chain1(first: Candidate, rest: Iterator[Candidate]) -> Iterator[Candidate]:
    yield first
    yield from rest


def _thin(lane: Iterable[Candidate], need: _Need, too_old: Callable[[Candidate], bool]) -> list[Victim]:
    """Every other record of the lane, oldest first, pass after pass, while the queue is over a bound."""
    victims: list[Victim] = []
    survivors: list[Candidate] = []
    for c in lane:  # age first: an expired record goes whatever the thinning pattern
        if too_old(c) and not c.leased:
            victims.append(Victim(c.seq, c.priority, c.size_bytes, CAUSE_MAX_AGE))
            need.take(c)
        else:
            survivors.append(c)
    while need.cause() is not None:
        free = [c for c in survivors if not c.leased]
        if not free:
            break
        if len(free) == 1:
            drop = free  # nothing left to thin: the last record goes too
        else:
            drop = free[1::2]  # keep the 1st, 3rd, ... so the oldest record of the lane survives a pass
        dropped: set[int] = set()
        for c in drop:
            cause = need.cause()
            if cause is None:
                break
            victims.append(Victim(c.seq, c.priority, c.size_bytes, cause))
            need.take(c)
            dropped.add(c.seq)
        survivors = [c for c in survivors if c.seq not in dropped]
    return victims


@dataclass(frozen=True, slots=True)
class LanePolicy:
    """Live lane vs backlog: a record enqueued within `live_window_s` is live and goes first; older
    records drain oldest-first behind it, at most `backlog_bytes_per_s` on average (None: unlimited)
    with bursts up to `backlog_burst_bytes`, so a weeks-long backlog cannot starve the live data of a
    thin cellular link."""

    live_window_s: float = DEFAULT_LIVE_WINDOW_S
    backlog_bytes_per_s: float | None = None
    backlog_burst_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if not self.live_window_s >= 0:
            raise ValueError("live_window_s must be >= 0")
        if self.backlog_bytes_per_s is not None and not self.backlog_bytes_per_s > 0:
            raise ValueError("backlog_bytes_per_s must be > 0 or None")
        if self.backlog_burst_bytes < 1:
            raise ValueError("backlog_burst_bytes must be >= 1")


class BacklogBudget:
    """Token bucket for the backlog lane (pure: monotonic `now_s` is passed in).

    The bucket starts full. The backlog leases only once the bucket holds a whole batch's worth
    (`ready`), so it goes out in full batches at the configured average rate rather than in slivers. A
    lease may still overspend by one oversized record (a batch always takes at least one record); the
    debt is repaid before the next backlog lease."""

    def __init__(self, policy: LanePolicy) -> None:
        self._policy = policy
        self._tokens = float(policy.backlog_burst_bytes)
        self._at_s: float | None = None

    def _refill(self, now_s: float) -> None:
        rate = self._policy.backlog_bytes_per_s
        if self._at_s is not None and rate is not None and now_s > self._at_s:
            self._tokens = min(float(self._policy.backlog_burst_bytes),
                               self._tokens + (now_s - self._at_s) * rate)
        if self._at_s is None or now_s > self._at_s:
            self._at_s = now_s

    def allowance(self, now_s: float) -> int | None:
        """Bytes the backlog may lease now; None when unlimited, 0 when it must wait."""
        if self._policy.backlog_bytes_per_s is None:
            return None
        self._refill(now_s)
        return max(0, int(self._tokens))

    def spend(self, n_bytes: int, now_s: float) -> None:
        if self._policy.backlog_bytes_per_s is None:
            return
        self._refill(now_s)
        self._tokens -= n_bytes

    def batch_bytes(self, max_bytes: int | None) -> int:
        """The budget a backlog lease waits for: a whole batch, but never more than the burst."""
        burst = self._policy.backlog_burst_bytes
        return burst if max_bytes is None else min(max_bytes, burst)

    def ready(self, now_s: float, max_bytes: int | None) -> bool:
        allowance = self.allowance(now_s)
        return allowance is None or allowance >= self.batch_bytes(max_bytes)

    def wait_s(self, now_s: float, max_bytes: int | None = None) -> float:
        """Seconds until a backlog lease of up to `max_bytes` may go (0 when it may now)."""
        rate = self._policy.backlog_bytes_per_s
        if rate is None:
            return 0.0
        self._refill(now_s)
        return max(0.0, (self.batch_bytes(max_bytes) - self._tokens) / rate)


@dataclass(frozen=True, slots=True)
class GapSpan:
    """One gap to record: `count` victims of `priority` evicted for `cause`, seqs within first..last."""

    priority: Priority
    cause: str
    first_seq: int
    last_seq: int
    count: int


def spans_of(victims: Iterable[Victim]) -> list[GapSpan]:
    """Group one eviction's victims by (priority, cause): one gap each, so a gap range never claims a
    record the eviction kept without saying how many it dropped (`count`)."""
    acc: dict[tuple[Priority, str], list[int]] = {}
    for v in victims:
        acc.setdefault((v.priority, v.cause), []).append(v.seq)
    return [GapSpan(p, cause, min(seqs), max(seqs), len(seqs))
            for (p, cause), seqs in sorted(acc.items(), key=lambda kv: min(kv[1]))]


def live_cutoff_ns(now_ns: int, live_window_s: float) -> int:
    """Records enqueued at or after this time are live."""
    return now_ns - int(live_window_s * 1e9)
