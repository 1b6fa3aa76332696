"""The durable queue: the `Queue` contract on one SQLite file in WAL mode (all of the store's SQL lives here).

Durability. A record is accepted only when `append` returns, and `append` returns only after COMMIT.
With `synchronous=FULL` (the default) every commit fsyncs the WAL, so a committed record survives a
power cut; `NORMAL` only fsyncs at checkpoints (survives a process crash, may lose the last commits on
power loss) and is for deployments that trade that for flash wear. Group commit (many callers' records
in one transaction) is the facade's job and is what makes FULL affordable.

Sequence numbers. `counters.next_seq` is the high-water mark; it is updated in the same transaction
that inserts the rows, so a seq is never handed out twice, even when the rows with the highest seqs were
deleted before a restart (SQLite's own rowid would reuse them). The counters row also carries depth and
bytes per priority and lifetime totals, so `stats()` and opening a large store cost O(1), not a scan.
The generation (a random id) is written once into `meta` when the file is created.

Flash. The page size is 4096 bytes (the erase/program granularity most eMMC/SD translation layers are
tuned for). `wal_autocheckpoint` is 0: SQLite's automatic checkpoint would run inside whichever COMMIT
crosses the threshold, adding the checkpoint's page writes and fsync to an append's latency. Instead
the writer thread calls `checkpoint()` (PASSIVE: never waits for readers) when it is idle, and as a
backstop the queue checkpoints by itself after roughly `wal_checkpoint_bytes` of WAL writes. Batching
many commits into one checkpoint also writes each hot page (counters row, index tail) to the database
file once instead of once per commit. `journal_size_limit` truncates a WAL that a burst made large.

Lanes. A record is live while its `enqueued_ns` is within the live window of the store clock. The
boundary is found by binary search over seq (the primary key), which assumes enqueue times grow with
seq; after a wall-clock step back, records enqueued around the step may land in the other lane (they
are still delivered, only the `historical` mark may be off). Each lane is then read per priority as a
range of the covering drain index, so a live lease does not walk a million-record backlog.

Gaps. `evict` deletes its victims and inserts their `gaps` rows in the same transaction, so a crash can
never leave a silent hole; `settle_gap` deletes a row once the forwarder announced it upstream.

Integrity. The constructor runs `PRAGMA quick_check` by default (O(file) reads, no index cross-checks),
`integrity_check` when asked for "full", or nothing ("off"). Damage raises `StoreCorrupt`, which
`salvage.open_store` turns into quarantine + salvage; a foreign or newer file raises `StoreForeign`.

Flash wear. `stats()` reports the bytes this process wrote to storage since the store opened (from
/proc/self/io `write_bytes`, or the growth of the DB and WAL files when that is unavailable or zero,
e.g. on tmpfs), their ratio to payload bytes appended (write amplification) and an hourly rate.

Full disk. On a full disk SQLite cannot even delete: a DELETE writes WAL frames, and a checkpoint
grows the database file. So a queue that filled the disk could never drain. The store therefore keeps
a ballast file `<path>-reserve` (`reserve_bytes`, default 256 KiB): when a settle, eviction or gap
settlement fails with SQLITE_FULL, the ballast is released and the operation retried once, and the
ballast is re-created at a later checkpoint when the file system has room again. Appends (and the
checkpoints they trigger) never release it: it exists so that what is stored can always be delivered
or evicted. It covers forwarder-sized settles (hundreds of records), not deleting a whole store in one
transaction (a DELETE writes every page it touches to the WAL).

Leases live in memory (`leases.LeaseBook`); the database never records them, so after a crash every
unsettled record is leaseable again. One process may open the store for writing at a time: an
exclusive `flock` on the file enforces it (`StoreBusy`). Read-only inspection (`open_readonly`) takes
no lock and may run beside the agent.

Errors from sqlite3 are translated here and nowhere else: see `_translate`.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from store_forward.leases import LeaseBook, choose, split_settlement
from store_forward.model import (
    DEFAULT_LIVE_WINDOW_S,
    PRIORITY_COUNT,
    Batch,
    Gap,
    GapReason,
    Lane,
    NewRecord,
    Priority,
    QueueStats,
    StoreBusy,
    StoreClosed,
    StoreCorrupt,
    StoredRecord,
    StoreError,
    StoreForeign,
    StoreFull,
    StoreIOError,
    validate_lease_args,
    validate_new_records,
)
from store_forward.policy import (
    CAUSE_DISK_FLOOR,
    CAUSE_DISK_FULL,
    Candidate,
    QueueBounds,
    disk_deficit_bytes,
    live_cutoff_ns,
    plan_eviction,
    spans_of,
)

Integrity = Literal["off", "quick", "full"]
_T = TypeVar("_T")

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: gaps table
APPLICATION_ID = 0x46475146  # "FGQF": marks the file as a fieldgate queue in the SQLite header
PAGE_SIZE = 4096
WAL_CHECKPOINT_BYTES = 4 * 1024 * 1024
JOURNAL_SIZE_LIMIT_BYTES = 8 * 1024 * 1024
BUSY_TIMEOUT_MS = 5000
RESERVE_BYTES = 256 * 1024
_IN_CHUNK = 500  # stays below SQLITE_MAX_VARIABLE_NUMBER on old builds (999)

# Schema 2 adds the gaps table; a version 1 store gets it on open (see `_migrate`).
_DDL_V2 = (
    # priority NULL: unknown (rows that could not be read). reason: 'evicted' | 'lost'. AUTOINCREMENT:
    # a gap id is never reused, so a late settle_gap can not delete a newer gap.
    "CREATE TABLE IF NOT EXISTS gaps ("
    " gap_id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " generation TEXT NOT NULL,"
    " first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,"
    " priority INTEGER CHECK (priority IS NULL OR priority BETWEEN 0 AND 4),"
    " reason TEXT NOT NULL, detail TEXT NOT NULL, count INTEGER NOT NULL,"
    " recorded_ns INTEGER NOT NULL)",
)
_DDL = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE counters ("
    " id INTEGER PRIMARY KEY CHECK (id = 0),"
    " next_seq INTEGER NOT NULL,"
    " appended_total INTEGER NOT NULL, appended_bytes_total INTEGER NOT NULL,"
    " acked_total INTEGER NOT NULL, rejected_total INTEGER NOT NULL, evicted_total INTEGER NOT NULL,"
    " depth_0 INTEGER NOT NULL, depth_1 INTEGER NOT NULL, depth_2 INTEGER NOT NULL,"
    " depth_3 INTEGER NOT NULL, depth_4 INTEGER NOT NULL,"
    " bytes_0 INTEGER NOT NULL, bytes_1 INTEGER NOT NULL, bytes_2 INTEGER NOT NULL,"
    " bytes_3 INTEGER NOT NULL, bytes_4 INTEGER NOT NULL)",
    # seq is the rowid, assigned by us from counters.next_seq (never by SQLite, which reuses max+1).
    "CREATE TABLE records ("
    " seq INTEGER PRIMARY KEY,"
    " priority INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 4),"
    " kind TEXT NOT NULL,"
    " ts_ns INTEGER NOT NULL,"
    " enqueued_ns INTEGER NOT NULL,"
    " payload_size INTEGER NOT NULL,"
    " payload BLOB NOT NULL)",
    # Covering index for lease: walks drain order and sizes without touching row (payload) pages, so
    # skipping records already under lease costs index entries only.
    "CREATE INDEX records_drain ON records (priority, seq, payload_size)",
    *_DDL_V2,
)
_COUNTER_COLUMNS = (
    "next_seq, appended_total, appended_bytes_total, acked_total, rejected_total, evicted_total, "
    "depth_0, depth_1, depth_2, depth_3, depth_4, bytes_0, bytes_1, bytes_2, bytes_3, bytes_4"
)
_SQL_SELECT_COUNTERS = f"SELECT {_COUNTER_COLUMNS} FROM counters WHERE id = 0"
_SQL_INSERT_COUNTERS = f"INSERT INTO counters (id, {_COUNTER_COLUMNS}) VALUES (0, {', '.join('?' * 16)})"
_SQL_UPDATE_COUNTERS = (
    "UPDATE counters SET "
    + ", ".join(f"{c.strip()} = ?" for c in _COUNTER_COLUMNS.split(","))
    + " WHERE id = 0"
)
_RECORD_FIELDS = 7  # seq, priority, kind, ts_ns, enqueued_ns, payload_size, payload
# Appends insert up to 128 rows per statement (multi-row VALUES): one sqlite3_step (and one release of
# the GIL) per 128 rows instead of per row, which roughly halves SQLite's CPU per appended record. 128 x 7
# parameters stays below SQLITE_MAX_VARIABLE_NUMBER on old builds (999). The sizes are fixed (a group is
# split greedily into 128-, 16- and 1-row statements), so three prepared statements serve every append.
_INSERT_ROWS_PER_STATEMENT = (128, 16, 1)
_SQL_INSERT_RECORDS = {
    n: "INSERT INTO records (seq, priority, kind, ts_ns, enqueued_ns, payload_size, payload) VALUES "
       + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * n)
    for n in _INSERT_ROWS_PER_STATEMENT
}
_SQL_DELETE_RECORD = "DELETE FROM records WHERE seq = ?"
_SQL_LANE_OLDEST_FIRST = "SELECT seq, payload_size, enqueued_ns FROM records WHERE priority = ? ORDER BY seq"
_SQL_LANE_RANGE = ("SELECT seq, payload_size FROM records WHERE priority = ? AND seq >= ? AND seq < ?"
                   " ORDER BY seq")
_SQL_FIRST_AT_OR_AFTER = "SELECT seq, enqueued_ns FROM records WHERE seq >= ? ORDER BY seq LIMIT 1"
_SQL_INSERT_GAP = (
    "INSERT INTO gaps (generation, first_seq, last_seq, priority, reason, detail, count, recorded_ns)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_SELECT_GAPS = (
    "SELECT gap_id, generation, first_seq, last_seq, priority, reason, detail, count, recorded_ns"
    " FROM gaps ORDER BY gap_id LIMIT ?"
)
_SQL_ROW_COLUMNS = "seq, kind, payload, ts_ns, priority, enqueued_ns"
_SQL_RECOUNT = "SELECT priority, count(*), coalesce(sum(payload_size), 0) FROM records GROUP BY priority"
# One row of _SQL_ROW_COLUMNS: seq, kind, payload, ts_ns, priority, enqueued_ns.
_Row = tuple[int, str, bytes, int, int, int]
_SQL_OLDEST_TS = "SELECT ts_ns FROM records ORDER BY seq LIMIT 1"
_SQL_MAX_SEQ = "SELECT max(seq) FROM records"

# Primary result codes (sqlite3.h) used to decide what the caller should do.
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26


@contextlib.contextmanager
def _translate(path: str, doing: str) -> Iterator[None]:
    """Turn sqlite3 errors into the store's typed errors, naming the file and what we were doing."""
    try:
        yield
    except sqlite3.Error as e:
        code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
        where = f"{path}: {doing}: {e}"
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise StoreCorrupt(f"{where} (the queue database is damaged; salvage or replace it)") from e
        if code == _SQLITE_FULL:
            raise StoreFull(f"{where} (not stored; free space or let the backlog drain)") from e
        if code in (_SQLITE_IOERR, _SQLITE_CANTOPEN, _SQLITE_READONLY, _SQLITE_PERM):
            raise StoreIOError(f"{where} (did not take effect; retry, stop if it persists)") from e
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            raise StoreBusy(f"{where} (another connection holds the database)") from e
        if isinstance(e, sqlite3.IntegrityError):
            # Only a counters row that lags the records table can make our own inserts collide.
            raise StoreCorrupt(f"{where} (seq high-water mark is inconsistent)") from e
        raise StoreError(where) from e


@dataclass(frozen=True, slots=True)
class _Counters:
    next_seq: int
    appended_total: int
    appended_bytes_total: int
    acked_total: int
    rejected_total: int
    evicted_total: int
    depth: tuple[int, ...]
    bytes: tuple[int, ...]

    @classmethod
    def fresh(cls) -> _Counters:
        zeros = (0,) * PRIORITY_COUNT
        return cls(1, 0, 0, 0, 0, 0, zeros, zeros)

    @classmethod
    def from_row(cls, row: Sequence[int]) -> _Counters:
        n, k = PRIORITY_COUNT, 6
        return cls(row[0], row[1], row[2], row[3], row[4], row[5], tuple(row[k:k + n]),
                   tuple(row[k + n:k + 2 * n]))

    def as_row(self) -> tuple[int, ...]:
        return (self.next_seq, self.appended_total, self.appended_bytes_total, self.acked_total,
                self.rejected_total, self.evicted_total, *self.depth, *self.bytes)


def new_generation() -> str:
    return secrets.token_hex(8)


def _gap_of(row: Sequence[object]) -> Gap:
    gap_id, generation, first, last, prio, reason, detail, count, recorded_ns = row
    assert isinstance(prio, int | None)
    return Gap(int(str(gap_id)), str(generation), int(str(first)), int(str(last)),
               None if prio is None else Priority(prio), GapReason(str(reason)), str(detail),
               int(str(count)), int(str(recorded_ns)))


def _proc_write_bytes() -> int | None:
    """This process's bytes sent to the storage layer (/proc/self/io), None where Linux does not say."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split(":", 1)[1])
    except (OSError, ValueError):
        return None
    return None


def _files_bytes(path: str) -> int:
    total = 0
    for name in (path, path + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.path.getsize(name)
    return total


class _WearMeter:
    """Flash-wear counters since the store was opened (see the module docstring, "Flash wear")."""

    def __init__(self, path: str, appended_bytes_total: int, now_ns: int) -> None:
        self._path = path
        self._proc0 = _proc_write_bytes()
        self._files0 = _files_bytes(path)
        self._files_max = self._files0
        self._appended0 = appended_bytes_total
        self._t0_ns = now_ns

    def read(self, appended_bytes_total: int, now_ns: int) -> tuple[int, str, float | None, float | None]:
        """(written_bytes, written_source, write_amplification, written_bytes_per_hour)."""
        proc = _proc_write_bytes()
        # The WAL shrinks when a checkpoint truncates it: the high-water mark is the better lower bound.
        self._files_max = max(self._files_max, _files_bytes(self._path))
        files_delta = self._files_max - self._files0
        proc_delta = None if proc is None or self._proc0 is None else proc - self._proc0
        if proc_delta:  # 0 on file systems with no block layer (tmpfs): fall back to file growth
            written, source = proc_delta, "proc"
        else:
            written, source = files_delta, "files"
        payload = appended_bytes_total - self._appended0
        hours = (now_ns - self._t0_ns) / 3.6e12
        return (written, source, written / payload if payload > 0 else None,
                written / hours if hours > 0 else None)


class SqliteQueue:
    """The durable `Queue`. Not thread-safe: one thread (the facade's writer) owns an instance."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: Literal["FULL", "NORMAL"] = "FULL",
                 clock_ns: Callable[[], int] = time.time_ns,
                 wal_checkpoint_bytes: int = WAL_CHECKPOINT_BYTES, integrity: Integrity = "quick",
                 generation: str | None = None, reserve_bytes: int = RESERVE_BYTES) -> None:
        """Open or create the store. `generation` fixes the id of a store created now (salvage uses it
        to report the new generation); it is ignored for an existing store."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        if integrity not in ("off", "quick", "full"):
            raise ValueError("integrity must be 'off', 'quick' or 'full'")
        self.path = os.fspath(path)
        self._new_generation = generation
        self._reserve_path = self.path + "-reserve"
        self._reserve_bytes = reserve_bytes
        self._clock_ns = clock_ns
        self._wal_checkpoint_bytes = wal_checkpoint_bytes
        self._wal_bytes_since_checkpoint = 0
        self._book = LeaseBook()
        self._conn: sqlite3.Connection | None = None
        self._lock_fd = self._take_writer_lock()
        try:
            self._conn = self._connect()
            self._prepare(synchronous, integrity)
            self._wear = _WearMeter(self.path, self._counters.appended_bytes_total, self._clock_ns())
            self._reserve_ok = self._ensure_reserve()
        except BaseException:
            self._release()
            raise

    # -- opening -------------------------------------------------------------------------------------

    def _take_writer_lock(self) -> int:
        # flock (not fcntl/POSIX locks): it does not interfere with SQLite's own POSIX locks, and it is
        # released by the kernel when the process dies, so a SIGKILLed writer never leaves a stale lock.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise StoreIOError(f"{self.path}: cannot open queue file: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise StoreBusy(f"{self.path}: another process has this queue open for writing") from e
        except OSError as e:
            os.close(fd)
            raise StoreIOError(f"{self.path}: cannot lock queue file: {e}") from e
        return fd

    def _connect(self) -> sqlite3.Connection:
        with _translate(self.path, "open"):
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so the write lock is
            # taken at the start of each transaction and nothing commits implicitly.
            return sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)

    def _prepare(self, synchronous: str, integrity: Integrity) -> None:
        conn = self._db()
        with _translate(self.path, "read header"):
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            n_objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if n_objects == 0:
            self._create(conn)
        elif app_id != APPLICATION_ID:
            raise StoreForeign(f"{self.path}: not a fieldgate queue (application_id {app_id:#x}); "
                               "refusing to touch a foreign database")
        with _translate(self.path, "configure"):
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreIOError(f"{self.path}: cannot switch to WAL (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
            conn.execute("PRAGMA temp_store = MEMORY")
        if integrity != "off":
            pragma = "quick_check" if integrity == "quick" else "integrity_check"
            with _translate(self.path, pragma):
                problems = [r[0] for r in conn.execute(f"PRAGMA {pragma}(10)")]
            if problems != ["ok"]:
                raise StoreCorrupt(f"{self.path}: {pragma} failed: {'; '.join(problems)}")
        self._load(conn)
        self._migrate(conn)

    def _create(self, conn: sqlite3.Connection) -> None:
        with _translate(self.path, "create schema"):
            # page_size must be set before the first table exists (and before WAL) to take effect.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _DDL:
                    conn.execute(stmt)
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("generation", self._new_generation or new_generation()),
                    ("created_ns", str(self._clock_ns())),
                ])
                conn.execute(_SQL_INSERT_COUNTERS, _Counters.fresh().as_row())
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute("COMMIT")
            except BaseException:
                _rollback_quietly(conn)
                raise

    def _load(self, conn: sqlite3.Connection) -> None:
        with _translate(self.path, "load meta"):
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                row = conn.execute(_SQL_SELECT_COUNTERS).fetchone()
                max_seq = conn.execute(_SQL_MAX_SEQ).fetchone()[0]
            except sqlite3.OperationalError as e:
                # A missing table in a file that carries our application_id: a damaged store.
                raise StoreCorrupt(f"{self.path}: queue schema is incomplete: {e}") from e
        try:
            version = int(meta["schema_version"])
            generation = meta["generation"]
        except (KeyError, ValueError) as e:
            raise StoreCorrupt(f"{self.path}: meta table lacks a valid schema_version/generation") from e
        if version > SCHEMA_VERSION:
            raise StoreForeign(f"{self.path}: schema_version {version} is newer than this agent's "
                               f"{SCHEMA_VERSION}; upgrade the agent or move the file aside")
        if row is None:
            raise StoreCorrupt(f"{self.path}: counters row is missing")
        counters = _Counters.from_row(row)
        if max_seq is not None and max_seq >= counters.next_seq:
            raise StoreCorrupt(f"{self.path}: record seq {max_seq} is at or above the high-water mark "
                               f"{counters.next_seq}; seqs could be reused")
        self.generation: str = generation
        self.schema_version = version
        self._counters = counters
        self._live_hint: tuple[int, int] | None = None  # (cutoff_ns, floor seq) of the last lane lookup

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring an older schema up to date in one transaction (the version is bumped in it too)."""
        if self.schema_version >= SCHEMA_VERSION:
            return
        with _translate(self.path, f"migrate schema {self.schema_version} -> {SCHEMA_VERSION}"), \
                self._transaction(conn):
            for stmt in _DDL_V2:
                conn.execute(stmt)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        self.schema_version = SCHEMA_VERSION

    # -- the Queue contract --------------------------------------------------------------------------

    def append(self, records: Sequence[NewRecord], *,
               before_commit: Callable[[], None] | None = None) -> list[int]:
        validate_new_records(records)
        return self._append(records, None, before_commit)

    def restore(self, records: Sequence[NewRecord], enqueued_ns: Sequence[int]) -> list[int]:
        """Append records keeping their original enqueue times (salvage), so age bounds and lanes
        judge them by when they were first stored."""
        validate_new_records(records)
        if len(enqueued_ns) != len(records):
            raise ValueError("restore: one enqueued_ns per record")
        return self._append(records, enqueued_ns)

    def _append(self, records: Sequence[NewRecord], enqueued: Sequence[int] | None,
                before_commit: Callable[[], None] | None = None) -> list[int]:
        """Insert records; `enqueued` gives each one's enqueue time (salvage keeps the original ones),
        None stamps them all with the clock now. `before_commit` runs inside the transaction, after the
        rows and counters are written, right before COMMIT (see `Queue.append`)."""
        conn = self._db()
        if not records:
            return []
        c = self._counters
        n_records = len(records)
        first = c.next_seq
        depth, size = list(c.depth), list(c.bytes)
        # One flat parameter list, built in one pass: this loop runs per stored record, so it binds plain
        # ints (not the IntEnum) and creates no per-row tuple.
        params: list[object] = []
        put = params.extend
        seq = first
        stamps = itertools.repeat(self._clock_ns(), n_records) if enqueued is None else enqueued
        for r, enq_ns in zip(records, stamps, strict=True):
            payload = r.payload
            n, p = len(payload), r.priority._value_
            put((seq, p, r.kind, r.ts_ns, enq_ns, n, payload))
            depth[p] += 1
            size[p] += n
            seq += 1
        total_bytes = sum(size) - sum(c.bytes)
        new = replace(c, next_seq=first + n_records, appended_total=c.appended_total + n_records,
                      appended_bytes_total=c.appended_bytes_total + total_bytes,
                      depth=tuple(depth), bytes=tuple(size))
        with _translate(self.path, f"append {n_records} record(s)"), self._transaction(conn):
            self._insert_rows(conn, params)
            conn.execute(_SQL_UPDATE_COUNTERS, new.as_row())
            if before_commit is not None:
                before_commit()
        # Adopt the new counters only after COMMIT: a failed transaction leaves memory and disk agreeing.
        self._counters = new
        self._after_write(total_bytes + PAGE_SIZE * (2 + n_records // 64))
        return list(range(first, first + n_records))

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, params: list[object]) -> None:
        """Insert the rows of `params` (flat, `_RECORD_FIELDS` values per row) with the fewest
        statements of the fixed sizes in `_INSERT_ROWS_PER_STATEMENT`."""
        start, end = 0, len(params)
        for rows in _INSERT_ROWS_PER_STATEMENT:
            width = rows * _RECORD_FIELDS
            stop = start + (end - start) // width * width
            if stop > start:
                conn.executemany(_SQL_INSERT_RECORDS[rows],
                                 [params[i:i + width] for i in range(start, stop, width)])
            start = stop
        assert start == end, "the last statement size must be 1 row"

    def lease(self, max_items: int, now_s: float, *, max_bytes: int | None = None,
              lease_s: float = 60.0, lane: Lane = Lane.ANY,
              live_window_s: float = DEFAULT_LIVE_WINDOW_S) -> Batch:
        conn = self._db()
        validate_lease_args(max_items, max_bytes, lease_s, lane, live_window_s)
        self._book.observe(now_s)
        cutoff_ns = live_cutoff_ns(self._clock_ns(), live_window_s)
        with _translate(self.path, "lease"):
            lo, hi = 1, self._counters.next_seq
            if lane is not Lane.ANY:
                floor = self._live_floor(conn, cutoff_ns)
                lo, hi = (floor, hi) if lane is Lane.LIVE else (lo, floor)
            seqs = choose(self._lane_order(conn, lo, hi), self._book, now_s, max_items, max_bytes)
            rows = self._fetch(conn, seqs)
        if not seqs:
            return Batch(0, (), self.generation, now_s, lane is Lane.BACKLOG)
        lease_id, expires_s = self._book.grant(seqs, now_s, lease_s)
        records = tuple(
            StoredRecord(self.generation, seq, kind, bytes(payload), ts_ns, Priority(prio), enq_ns,
                         self._book.attempts(seq))
            for seq, kind, payload, ts_ns, prio, enq_ns in (rows[s] for s in seqs)
        )
        historical = lane is Lane.BACKLOG or (
            lane is Lane.ANY and any(r.enqueued_ns < cutoff_ns for r in records))
        return Batch(lease_id, records, self.generation, expires_s, historical)

    @staticmethod
    def _lane_order(conn: sqlite3.Connection, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """(seq, payload_size) with lo <= seq < hi in drain order: one index range per priority."""
        for p in Priority:
            cur = conn.execute(_SQL_LANE_RANGE, (int(p), lo, hi))
            try:
                yield from cur
            finally:
                cur.close()

    def _live_floor(self, conn: sqlite3.Connection, cutoff_ns: int) -> int:
        """The lowest seq of the live lane: binary search for the first stored row enqueued at or after
        `cutoff_ns`. Starts from the last answer when the cutoff only moved forward (it usually did)."""
        lo, hi = 1, self._counters.next_seq
        if self._live_hint is not None and self._live_hint[0] <= cutoff_ns:
            lo = min(self._live_hint[1], hi)
        while lo < hi:
            mid = (lo + hi) // 2
            row = conn.execute(_SQL_FIRST_AT_OR_AFTER, (mid,)).fetchone()
            if row is None or row[0] >= hi or row[1] >= cutoff_ns:
                hi = mid  # no row in mid..hi-1 is backlog: the floor is at or below mid
            else:
                lo = row[0] + 1
        self._live_hint = (cutoff_ns, lo)
        return lo

    def settle(self, batch: Batch, acked: Iterable[int], rejected: Iterable[int] = ()) -> None:
        acked_l, rejected_l, released = split_settlement(batch, self.generation, acked, rejected)
        self._using_reserve(lambda: self._settle(batch, acked_l, rejected_l, released))

    def _settle(self, batch: Batch, acked_l: list[int], rejected_l: list[int], released: list[int]) -> None:
        conn = self._db()
        done = acked_l + rejected_l
        if done:
            by_seq = {r.seq: r for r in batch.records}
            c = self._counters
            with _translate(self.path, f"settle {len(done)} record(s)"), self._transaction(conn):
                # A seq may already be gone (acked through an older, expired lease): delete and count
                # only what is still there, inside the same transaction.
                present = self._present(conn, done)
                conn.executemany(_SQL_DELETE_RECORD, [(s,) for s in done if s in present])
                depth, size = list(c.depth), list(c.bytes)
                for s in present:
                    rec = by_seq[s]
                    depth[rec.priority] -= 1
                    size[rec.priority] -= len(rec.payload)
                n_acked = sum(1 for s in acked_l if s in present)
                n_rejected = len(present) - n_acked
                new = replace(c, acked_total=c.acked_total + n_acked,
                              rejected_total=c.rejected_total + n_rejected,
                              depth=tuple(depth), bytes=tuple(size))
                conn.execute(_SQL_UPDATE_COUNTERS, new.as_row())
            self._counters = new
            self._after_write(PAGE_SIZE * (2 + len(done) // 32))
            self._book.forget(done)
        self._book.release(batch.lease_id, released)

    def stats(self) -> QueueStats:
        conn = self._db()
        with _translate(self.path, "stats"):
            row = conn.execute(_SQL_OLDEST_TS).fetchone()
            gaps = int(conn.execute("SELECT count(*) FROM gaps").fetchone()[0])
        c = self._counters
        written, source, amplification, per_hour = self._wear.read(c.appended_bytes_total, self._clock_ns())
        return QueueStats(
            generation=self.generation,
            depth=sum(c.depth),
            bytes=sum(c.bytes),
            oldest_ts_ns=None if row is None else int(row[0]),
            next_seq=c.next_seq,
            leased=self._book.held_count(),
            appended_total=c.appended_total,
            settled_total=c.acked_total + c.rejected_total,
            acked_total=c.acked_total,
            rejected_total=c.rejected_total,
            depth_by_priority=c.depth,
            appended_bytes_total=c.appended_bytes_total,
            evicted_total=c.evicted_total,
            gaps_pending=gaps,
            written_bytes=written,
            written_source=source,
            write_amplification=amplification,
            written_bytes_per_hour=per_hour,
        )

    def evict(self, bounds: QueueBounds, now_s: float, *, free_bytes: int = 0) -> int:
        """Delete what `policy.plan_eviction` selects and record it as gaps, in one transaction; returns
        the number deleted. `free_bytes` asks for that many payload bytes more (the disk is full)."""
        return self._using_reserve(lambda: self._evict(bounds, now_s, free_bytes))

    def _evict(self, bounds: QueueBounds, now_s: float, free_bytes: int) -> int:
        conn = self._db()
        self._book.observe(now_s)
        c = self._counters
        now_ns = self._clock_ns()
        deficit, cause = free_bytes, CAUSE_DISK_FULL
        if bounds.min_free_disk_bytes is not None:
            floor_deficit = disk_deficit_bytes(bounds, fs_free_bytes=self._fs_free_bytes(),
                                               db_free_bytes=self._db_free_bytes(conn))
            if floor_deficit > 0 and free_bytes == 0:
                cause = CAUSE_DISK_FLOOR
            deficit += floor_deficit
        with _translate(self.path, "evict"), self._transaction(conn):
            lanes = (
                (Candidate(seq, p, size, enq_ns, not self._book.is_free(seq, now_s))
                 for seq, size, enq_ns in conn.execute(_SQL_LANE_OLDEST_FIRST, (int(p),)))
                for p in bounds.eviction_order()
            )
            victims = plan_eviction(lanes, depth=sum(c.depth), size_bytes=sum(c.bytes), now_ns=now_ns,
                                    bounds=bounds, deficit_bytes=deficit, deficit_cause=cause)
            if not victims:
                return 0
            seqs = [v.seq for v in victims]
            conn.executemany(_SQL_DELETE_RECORD, [(s,) for s in seqs])
            depth, size = list(c.depth), list(c.bytes)
            for v in victims:
                depth[v.priority] -= 1
                size[v.priority] -= v.size_bytes
            conn.executemany(_SQL_INSERT_GAP, [
                (self.generation, g.first_seq, g.last_seq, int(g.priority), GapReason.EVICTED.value, g.cause,
                 g.count, now_ns)
                for g in spans_of(victims)
            ])
            new = replace(c, evicted_total=c.evicted_total + len(victims), depth=tuple(depth),
                          bytes=tuple(size))
            conn.execute(_SQL_UPDATE_COUNTERS, new.as_row())
        self._counters = new
        self._after_write(PAGE_SIZE * (3 + len(victims) // 32))
        self._book.forget(seqs)
        return len(victims)

    def _fs_free_bytes(self) -> int:
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError as e:
            raise StoreIOError(f"{self.path}: statvfs failed: {e} (retry; stop if it persists)") from e
        return st.f_bavail * st.f_frsize

    def _db_free_bytes(self, conn: sqlite3.Connection) -> int:
        with _translate(self.path, "freelist_count"):
            return int(conn.execute("PRAGMA freelist_count").fetchone()[0]) * PAGE_SIZE

    def pending_gaps(self, limit: int = 100) -> list[Gap]:
        conn = self._db()
        with _translate(self.path, "read gaps"):
            rows = conn.execute(_SQL_SELECT_GAPS, (limit,)).fetchall()
        return [_gap_of(row) for row in rows]

    def settle_gap(self, gap_id: int) -> None:
        def delete() -> None:
            conn = self._db()
            with _translate(self.path, f"settle gap {gap_id}"), self._transaction(conn):
                conn.execute("DELETE FROM gaps WHERE gap_id = ?", (gap_id,))

        self._using_reserve(delete)
        self._after_write(PAGE_SIZE * 2)

    def record_gap(self, generation: str, first_seq: int, last_seq: int, priority: Priority | None,
                   reason: GapReason, detail: str, count: int) -> None:
        """Durably record a gap found outside eviction (salvage: rows of an old generation lost)."""
        conn = self._db()
        with _translate(self.path, "record gap"), self._transaction(conn):
            conn.execute(_SQL_INSERT_GAP, (generation, first_seq, last_seq,
                                           None if priority is None else int(priority), reason.value,
                                           detail, count, self._clock_ns()))
        self._after_write(PAGE_SIZE * 2)

    def checkpoint(self) -> None:
        """PASSIVE WAL checkpoint: copies committed pages into the database file without waiting for
        readers; cheap when nothing was written since the last one."""
        conn = self._db()
        if self._wal_bytes_since_checkpoint == 0:
            if not self._reserve_ok:
                self._reserve_ok = self._ensure_reserve()
            return

        # Not through the ballast: appends trigger checkpoints, and appends must not eat the reserve that
        # lets the queue drain. Once a settle released it, the checkpoints can use that room too.
        with _translate(self.path, "checkpoint"):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self._wal_bytes_since_checkpoint = 0
        if not self._reserve_ok:
            self._reserve_ok = self._ensure_reserve()

    # -- the full-disk ballast -------------------------------------------------------------------------

    def _ensure_reserve(self) -> bool:
        """Create the ballast file if it is missing; False (and no partial file) when there is no room."""
        if self._reserve_bytes <= 0:
            return True
        try:
            if os.path.getsize(self._reserve_path) >= self._reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreIOError(f"{self._reserve_path}: {e} (retry; stop if it persists)") from e
        # Keep the ballast only if the file system still has as much again free afterwards: taking
        # the last free bytes for it would make the very next append fail.
        if self._fs_free_bytes() < 2 * self._reserve_bytes:
            return False
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.posix_fallocate(fd, 0, self._reserve_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(self._reserve_path)
            log.warning("%s: cannot create the full-disk reserve: %s", self.path, e)
            return False
        return True

    def _release_reserve(self) -> bool:
        """Free the ballast; True if there was one to free."""
        try:
            os.unlink(self._reserve_path)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreIOError(f"{self._reserve_path}: {e} (retry; stop if it persists)") from e
        self._reserve_ok = False
        log.warning("%s: disk full; released the %d-byte reserve so the queue can drain",
                    self.path, self._reserve_bytes)
        return True

    def _using_reserve(self, op: Callable[[], _T]) -> _T:
        """Run a draining operation; on a full disk, release the ballast and run it once more."""
        try:
            return op()
        except StoreFull:
            if not self._release_reserve():
                raise
        return op()

    def close(self) -> None:
        """Close the connection (SQLite checkpoints and removes the WAL when the last one closes)."""
        if self._conn is None:
            return
        try:
            with _translate(self.path, "close"):
                self._conn.close()
        finally:
            self._conn = None
            self._release()

    # -- helpers -------------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosed(f"{self.path}: queue is closed")
        return self._conn

    def _release(self) -> None:
        # Only after the SQLite connection is closed: closing any descriptor of the file would drop the
        # process's POSIX locks, which SQLite relies on.
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            _rollback_quietly(conn)
            raise

    def _after_write(self, approx_wal_bytes: int) -> None:
        self._wal_bytes_since_checkpoint += approx_wal_bytes
        if self._wal_bytes_since_checkpoint >= self._wal_checkpoint_bytes:
            try:
                self.checkpoint()
            except StoreError as e:
                # The write before this already committed: failing it now would make the caller retry
                # and duplicate records. The WAL just grows; the next write or idle call tries again.
                log.warning("%s: backstop checkpoint failed, will retry: %s", self.path, e)

    @staticmethod
    def _fetch(conn: sqlite3.Connection, seqs: Sequence[int]) -> dict[int, _Row]:
        rows: dict[int, _Row] = {}
        for i in range(0, len(seqs), _IN_CHUNK):
            chunk = seqs[i:i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            for row in conn.execute(f"SELECT {_SQL_ROW_COLUMNS} FROM records WHERE seq IN ({marks})", chunk):
                rows[row[0]] = row
        return rows

    @staticmethod
    def _present(conn: sqlite3.Connection, seqs: Sequence[int]) -> set[int]:
        found: set[int] = set()
        for i in range(0, len(seqs), _IN_CHUNK):
            chunk = seqs[i:i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            found.update(r[0] for r in conn.execute(f"SELECT seq FROM records WHERE seq IN ({marks})", chunk))
        return found

    def __enter__(self) -> SqliteQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    # The original error is what the caller needs; a failing ROLLBACK (SQLite may already have rolled
    # back after IOERR/FULL) adds nothing, and the connection stays usable or fails loudly next time.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


# -- read-only access for inspection (edge-agent buffer ...) --------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """What a read-only look at a queue file shows (leases are the writer's memory: not visible here)."""

    path: str
    generation: str
    schema_version: int
    created_ns: int | None
    depth: int
    bytes: int
    oldest_ts_ns: int | None
    next_seq: int
    appended_total: int
    appended_bytes_total: int
    acked_total: int
    rejected_total: int
    evicted_total: int
    depth_by_priority: tuple[int, ...]
    bytes_by_priority: tuple[int, ...]
    page_size: int
    page_count: int
    freelist_count: int
    wal_size_bytes: int | None


class ReadOnlyStore:
    """A read-only connection to a queue file; safe beside a running agent (WAL readers never block it)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise StoreIOError(f"{self.path}: no such queue file")
        with _translate(self.path, "open read-only"):
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                        timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            with _translate(self.path, "read header"):
                app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            if app_id != APPLICATION_ID:
                raise StoreCorrupt(f"{self.path}: not a fieldgate queue (application_id {app_id:#x})")
        except BaseException:
            self.conn.close()
            raise

    def snapshot(self) -> StoreSnapshot:
        conn = self.conn
        with _translate(self.path, "read stats"):
            conn.execute("BEGIN")  # one consistent read snapshot for all of the queries below
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                row = conn.execute(_SQL_SELECT_COUNTERS).fetchone()
                oldest = conn.execute(_SQL_OLDEST_TS).fetchone()
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                page_count = conn.execute("PRAGMA page_count").fetchone()[0]
                freelist = conn.execute("PRAGMA freelist_count").fetchone()[0]
            finally:
                conn.execute("COMMIT")
        if row is None or "generation" not in meta:
            raise StoreCorrupt(f"{self.path}: meta/counters missing")
        c = _Counters.from_row(row)
        wal = self.path + "-wal"
        created = meta.get("created_ns")
        return StoreSnapshot(
            path=self.path, generation=meta["generation"], schema_version=int(meta.get("schema_version", 0)),
            created_ns=int(created) if created is not None else None,
            depth=sum(c.depth), bytes=sum(c.bytes), oldest_ts_ns=None if oldest is None else int(oldest[0]),
            next_seq=c.next_seq, appended_total=c.appended_total,
            appended_bytes_total=c.appended_bytes_total, acked_total=c.acked_total,
            rejected_total=c.rejected_total, evicted_total=c.evicted_total,
            depth_by_priority=c.depth, bytes_by_priority=c.bytes,
            page_size=page_size, page_count=page_count, freelist_count=freelist,
            wal_size_bytes=os.path.getsize(wal) if os.path.exists(wal) else None,
        )

    def records(self, *, limit: int | None = None, priority: Priority | None = None,
                after_seq: int = 0) -> Iterator[StoredRecord]:
        """Stored records in drain order (priority, then seq); `attempts` is 0 (leases are not stored)."""
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        generation = meta.get("generation", "")
        where, args = ["seq > ?"], [after_seq]
        if priority is not None:
            where.append("priority = ?")
            args.append(int(priority))
        sql = (f"SELECT {_SQL_ROW_COLUMNS} FROM records WHERE {' AND '.join(where)} "
               "ORDER BY priority, seq" + (" LIMIT ?" if limit is not None else ""))
        if limit is not None:
            args.append(limit)
        with _translate(self.path, "read records"):
            for seq, kind, payload, ts_ns, prio, enq_ns in self.conn.execute(sql, args):
                yield StoredRecord(generation, seq, kind, bytes(payload), ts_ns, Priority(prio), enq_ns, 0)

    def gaps(self, limit: int = 1000) -> list[Gap]:
        """Unsettled gaps, oldest first (none for a schema 1 store, which had no gaps table)."""
        with _translate(self.path, "read gaps"):
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "gaps" not in tables:
                return []
            return [_gap_of(r) for r in self.conn.execute(_SQL_SELECT_GAPS, (limit,))]

    def lanes(self, now_ns: int, live_window_s: float = DEFAULT_LIVE_WINDOW_S) -> tuple[int, int]:
        """(live, backlog) record counts at `now_ns` (O(n): counts rows by enqueue time)."""
        cutoff = live_cutoff_ns(now_ns, live_window_s)
        with _translate(self.path, "count lanes"):
            live, total = self.conn.execute(
                "SELECT coalesce(sum(enqueued_ns >= ?), 0), count(*) FROM records", (cutoff,)).fetchone()
        return int(live), int(total) - int(live)

    def recount(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(depth, bytes) per priority counted from the rows (O(n)), to audit the counters row."""
        depth, size = [0] * PRIORITY_COUNT, [0] * PRIORITY_COUNT
        with _translate(self.path, "recount"):
            for prio, n, b in self.conn.execute(_SQL_RECOUNT):
                depth[prio], size[prio] = n, b
        return tuple(depth), tuple(size)

    def quick_check(self) -> list[str]:
        with _translate(self.path, "quick_check"):
            return [r[0] for r in self.conn.execute("PRAGMA quick_check(10)")]

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ReadOnlyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_readonly(path: str | os.PathLike[str]) -> ReadOnlyStore:
    return ReadOnlyStore(path)


# -- reading a damaged store (salvage) -------------------------------------------------------------------

_SALVAGE_SEQ_SPAN = 4096  # rows read per query while salvaging; a failing span is bisected
_SALVAGE_MAX_FAILURES = 10_000  # give up on the rest after this many unreadable probes


@dataclass(frozen=True, slots=True)
class SalvagedRow:
    old_seq: int
    record: NewRecord
    enqueued_ns: int


class DamagedStore:
    """Best-effort reader for a quarantined queue file: reads whatever rows SQLite can still return.

    Opens the file read-write (WAL recovery may need to write: the file is already set aside, so this
    never touches the live store) and never raises for damage: what could not be read is counted in
    `unreadable` and described in `problems`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.problems: list[str] = []
        self.unreadable = 0  # rows seen in the index or counters but not returned intact
        self.generation: str | None = None
        self.next_seq: int | None = None
        self.depth: int | None = None
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            self._conn.execute("PRAGMA query_only = 1")
            # A truncated file has fewer pages than its header claims; SQLite refuses to read such a file
            # at all unless writable_schema is on (query_only keeps this reader from writing anything).
            self._conn.execute("PRAGMA writable_schema = ON")
        except sqlite3.Error as e:
            self._problem("open", e)
            self._conn = None
            return
        self._read_header()

    def _problem(self, doing: str, e: BaseException) -> None:
        if len(self.problems) < 20:
            self.problems.append(f"{doing}: {e}")

    def _read_header(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            self.generation = meta.get("generation")
        except sqlite3.Error as e:
            self._problem("read meta", e)
        try:
            row = conn.execute(_SQL_SELECT_COUNTERS).fetchone()
            if row is not None:
                c = _Counters.from_row(row)
                self.next_seq, self.depth = c.next_seq, sum(c.depth)
        except sqlite3.Error as e:
            self._problem("read counters", e)
        if self.next_seq is None:
            try:
                top = conn.execute(_SQL_MAX_SEQ).fetchone()[0]
                self.next_seq = None if top is None else int(top) + 1
            except sqlite3.Error as e:
                self._problem("read max(seq)", e)

    def rows(self) -> Iterator[list[SalvagedRow]]:
        """Readable rows in seq order, in chunks; rows whose fields fail validation count as unreadable."""
        conn = self._conn
        if conn is None:
            return
        failures = 0
        hi_bound = self.next_seq if self.next_seq is not None else 2**62
        lo = 1
        while lo < hi_bound and failures < _SALVAGE_MAX_FAILURES:
            try:
                nxt = conn.execute("SELECT seq FROM records WHERE seq >= ? ORDER BY seq LIMIT 1",
                                   (lo,)).fetchone()
            except sqlite3.Error as e:
                self._problem(f"find rows from seq {lo}", e)
                failures += 1
                nxt = (lo,)  # the index is damaged here: probe span by span instead of jumping
            if nxt is None:
                return
            lo = max(lo, int(nxt[0]))
            hi = min(lo + _SALVAGE_SEQ_SPAN, hi_bound)
            chunk, failures = self._read_span(conn, lo, hi, failures)
            if chunk:
                yield chunk
            lo = hi

    def _read_span(self, conn: sqlite3.Connection, lo: int, hi: int,
                   failures: int) -> tuple[list[SalvagedRow], int]:
        try:
            raw = conn.execute(f"SELECT {_SQL_ROW_COLUMNS}, payload_size FROM records"
                               " WHERE seq >= ? AND seq < ? ORDER BY seq", (lo, hi)).fetchall()
        except sqlite3.Error as e:
            failures += 1
            if hi - lo <= 1 or failures >= _SALVAGE_MAX_FAILURES:
                self._problem(f"read seq {lo}..{hi - 1}", e)
                self.unreadable += 1 if hi - lo <= 1 else 0
                return [], failures
            mid = (lo + hi) // 2
            left, failures = self._read_span(conn, lo, mid, failures)
            right, failures = self._read_span(conn, mid, hi, failures)
            return left + right, failures
        out: list[SalvagedRow] = []
        for seq, kind, payload, ts_ns, prio, enq_ns, size in raw:
            ok = (isinstance(kind, str) and kind and isinstance(payload, bytes) and len(payload) == size
                  and isinstance(ts_ns, int) and isinstance(enq_ns, int) and prio in range(PRIORITY_COUNT))
            if not ok:
                self.unreadable += 1
                continue
            out.append(SalvagedRow(seq, NewRecord(kind, payload, ts_ns, Priority(prio)), enq_ns))
        return out, failures

    def gaps(self) -> list[Gap]:
        """Gaps the damaged store had not announced yet (they must not be forgotten either)."""
        if self._conn is None:
            return []
        try:
            rows = self._conn.execute(_SQL_SELECT_GAPS, (1_000_000,)).fetchall()
            return [_gap_of(r) for r in rows]
        except (sqlite3.Error, ValueError, TypeError) as e:
            self._problem("read gaps", e)
            return []

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
