"""Opening the store at start-up, and what happens when it is damaged: quarantine, salvage, report.

Theory of operation. `open_store` opens the queue with an integrity check (quick by default). If SQLite
or the check reports damage (`StoreCorrupt`, but not `StoreForeign`: a foreign or newer file is a
configuration problem and is left alone), the store is never deleted and never opened for writing again:

1. quarantine: the database and its `-wal`/`-shm` companions are renamed to
   `<name>.corrupt-<UTC timestamp>` (+ the same suffixes, so SQLite still pairs them) and the directory
   is fsynced, so the move survives a power cut;
2. salvage: a new store is created at the original path with a NEW generation, and every row that can
   still be read from the quarantined file is appended to it in the old seq order (kind, payload,
   data time, priority and enqueue time kept; the new store gives them new seqs), together with the
   gaps the old store had not announced yet;
3. account: one `lost` gap is recorded in the new store for the old generation: seqs up to its
   high-water mark that were neither delivered before nor salvaged will never come under the old
   generation (`count` = rows the old counters promised minus rows salvaged, when the counters were
   readable), and the detail says under which new seqs the salvaged rows are re-sent;
4. report: `OpenedStore.salvage` (a `SalvageReport`) tells the agent, which logs it and forwards it as
   an event record.

The new store is complete before `open_store` returns; a crash during salvage leaves the quarantined
file in place and a partial new store, and the next start salvages nothing twice because the
quarantined file is no longer at the store path (the partial new store is simply the store).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from store_forward.atomic import fsync_dir
from store_forward.model import GapReason, StoreCorrupt, StoreForeign
from store_forward.sqlite import DamagedStore, Integrity, SqliteQueue, new_generation

_COMPANIONS = ("-wal", "-shm")


@dataclass(frozen=True, slots=True)
class SalvageReport:
    """What happened to a damaged store (JSON-ready via `as_event`)."""

    path: str
    quarantined_path: str
    detected_ns: int
    problem: str
    old_generation: str | None
    old_next_seq: int | None
    old_depth: int | None
    new_generation: str
    rows_salvaged: int
    rows_lost: int | None  # None: the old counters were unreadable, so the loss cannot be counted
    first_new_seq: int | None
    last_new_seq: int | None
    gaps_carried: int
    read_problems: tuple[str, ...]

    def as_event(self) -> dict[str, Any]:
        """The event the agent forwards upstream (kind "store_salvaged")."""
        return {"event": "store_salvaged", **asdict(self), "read_problems": list(self.read_problems)}


@dataclass(frozen=True, slots=True)
class OpenedStore:
    queue: SqliteQueue
    salvage: SalvageReport | None


def quarantine(path: str | os.PathLike[str], now_ns: int) -> str:
    """Move the store and its WAL/SHM aside under a timestamped name (never deleted); returns the new
    path of the database file."""
    src = os.fspath(path)
    # Integer arithmetic: a float of epoch ns rounds the microseconds.
    seconds = datetime.fromtimestamp(now_ns // 10**9, UTC).strftime("%Y%m%dT%H%M%S")
    stamp = f"{seconds}.{now_ns // 1000 % 10**6:06d}Z"
    dst = f"{src}.corrupt-{stamp}"
    n = 1
    while os.path.exists(dst):  # two quarantines in one microsecond: never overwrite evidence
        dst = f"{src}.corrupt-{stamp}-{n}"
        n += 1
    # The WAL first: if we die between the renames, the database is still where it was (and is
    # quarantined again at the next start) while its WAL already sits beside the quarantined name.
    for suffix in _COMPANIONS:
        if os.path.exists(src + suffix):
            os.rename(src + suffix, dst + suffix)
    if os.path.exists(src):
        os.rename(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(src)))
    return dst


def salvage(damaged_path: str, new_path: str, *, problem: str, detected_ns: int,
            queue_factory: Callable[[str, str], SqliteQueue], batch_rows: int = 1000) -> OpenedStore:
    """Copy readable rows and gaps of `damaged_path` into a new store at `new_path` (see module doc)."""
    fresh_generation = new_generation()
    damaged = DamagedStore(damaged_path)
    q = queue_factory(new_path, fresh_generation)
    try:
        if q.stats().depth or q.stats().next_seq != 1:
            raise StoreCorrupt(f"{new_path}: salvage target is not empty; move it aside first")
        carried = 0
        for g in damaged.gaps():
            q.record_gap(g.generation, g.first_seq, g.last_seq, g.priority, g.reason, g.detail, g.count)
            carried += 1
        salvaged = 0
        first_new: int | None = None
        last_new: int | None = None
        max_old_seq = 0
        for chunk in damaged.rows():
            for i in range(0, len(chunk), batch_rows):
                part = chunk[i:i + batch_rows]
                seqs = q.restore([r.record for r in part], [r.enqueued_ns for r in part])
                first_new = seqs[0] if first_new is None else first_new
                last_new = seqs[-1]
                salvaged += len(part)
                max_old_seq = max(max_old_seq, part[-1].old_seq)
        lost = None if damaged.depth is None else max(0, damaged.depth - salvaged)
        old_gen = damaged.generation or "unknown"
        high = max((damaged.next_seq or 1) - 1, max_old_seq)
        moved = (f"{salvaged} readable row(s) re-sent as generation {q.generation} "
                 f"seqs {first_new}-{last_new}" if salvaged else "no row was readable")
        count_text = "count unknown: counters unreadable" if lost is None else f"{lost} row(s) unreadable"
        q.record_gap(old_gen, 1, max(1, high), None, GapReason.LOST,
                     f"store corrupt ({problem}); {count_text}; {moved}; generation {old_gen} ends here",
                     lost or 0)
        report = SalvageReport(
            path=new_path, quarantined_path=damaged_path, detected_ns=detected_ns, problem=problem,
            old_generation=damaged.generation, old_next_seq=damaged.next_seq, old_depth=damaged.depth,
            new_generation=q.generation, rows_salvaged=salvaged, rows_lost=lost, first_new_seq=first_new,
            last_new_seq=last_new, gaps_carried=carried, read_problems=tuple(damaged.problems),
        )
    except BaseException:
        q.close()
        raise
    finally:
        damaged.close()
    return OpenedStore(q, report)


def open_store(path: str | os.PathLike[str], *, integrity: Integrity = "quick",
               synchronous: Literal["FULL", "NORMAL"] = "FULL",
               clock_ns: Callable[[], int] = time.time_ns, **queue_kwargs: Any) -> OpenedStore:
    """Open the queue at `path`; a damaged one is quarantined and salvaged (module docstring).

    Raises `StoreForeign` (not ours / newer schema: fix the path or upgrade), `StoreBusy`,
    `StoreIOError`, and `StoreCorrupt` only if the freshly salvaged store is itself unusable."""
    target = os.fspath(path)

    def make(p: str, generation: str | None = None) -> SqliteQueue:
        return SqliteQueue(p, synchronous=synchronous, clock_ns=clock_ns, integrity=integrity,
                           generation=generation, **queue_kwargs)

    try:
        return OpenedStore(make(target), None)
    except StoreForeign:
        raise
    except StoreCorrupt as e:
        problem = str(e)
    detected_ns = clock_ns()
    moved_to = quarantine(target, detected_ns)
    return salvage(moved_to, target, problem=problem, detected_ns=detected_ns,
                   queue_factory=lambda p, g: make(p, g))


class StoreOpener:
    """A queue factory for `AsyncQueue` that salvages a damaged store; after `AsyncQueue.start()`,
    `salvage` holds the report (None when the store opened cleanly)."""

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        self.path = os.fspath(path)
        self.options = options
        self.salvage: SalvageReport | None = None

    def __call__(self) -> SqliteQueue:
        opened = open_store(self.path, **self.options)
        self.salvage = opened.salvage
        return opened.queue
