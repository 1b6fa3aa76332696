"""`edge-hil bench store`: the durable queue's ingest and drain rates against raw SQLite on the same disk.

Ours: 256-byte records appended through `AsyncQueue` over `SqliteQueue` with the production defaults
(synchronous=FULL, WAL, group commit of up to 512 records / 5 ms) by many concurrent appenders, as the
agent's pipeline does. Baseline, same run, same directory: raw `executemany` inserts into a plain
table with the same durability (WAL, synchronous=FULL, 4 KiB pages, the same batch size), i.e. what
SQLite itself can do with one fsync per batch and no queue logic. Then the backlog is drained through
`lease`/`settle` (forwarder-sized batches). Write amplification is bytes this process sent to storage
(/proc/self/io write_bytes) during the ingest, including the final checkpoint at close, divided by
payload bytes; where /proc does not count (tmpfs), the file growth is used instead (a lower bound).

Both sides commit `--batch` records per transaction, so they make the same number of commits (WAL
fsyncs); the bench prints both counts. Rounds run side by side in ABBA order on fresh files; the
reported ratio is the median of the per-round ratios, ingest and raw rates are medians, and the spread
(min/max and every round's ratio) is printed before the result line, as is raw SQLite's own write
amplification for comparison (a plain table has no index, counters or wider rows to write).

Ends with one line:
`bench store: ingest_per_s=X raw_sqlite_per_s=Y ratio=Z drain_per_s=W write_amplification=A`.
Targets: ratio >= 0.5, write_amplification <= 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from store_forward.facade import AsyncQueue
from store_forward.model import NewRecord, Priority
from store_forward.sqlite import PAGE_SIZE, SqliteQueue

RECORD_BYTES = 256


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=100_000,
                        help="records per side per round (default 100000)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="side-by-side rounds in ABBA order; medians and spread are reported "
                             "(fsync times are noisy)")
    parser.add_argument("--appenders", type=int, default=128, help="concurrent appenders (default 128)")
    parser.add_argument("--per-append", type=int, default=8,
                        help="records per append call, like one pipeline flush of a device (default 8)")
    parser.add_argument("--batch", type=int, default=512,
                        help="group commit / executemany size (default 512)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")


def _progress(msg: str) -> None:
    print(f"bench store: {msg}", flush=True)


def _proc_write_bytes() -> int | None:
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split(":", 1)[1])
    except (OSError, ValueError):
        return None
    return None


def _files_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


@dataclass(frozen=True, slots=True)
class _Side:
    """One side of one round: records/s, commits (= WAL fsyncs with synchronous=FULL), write amplification."""

    per_s: float
    commits: int
    write_amplification: float


def _amplification(path: str, w0: int | None, n: int) -> float:
    w1 = _proc_write_bytes()
    written = (w1 - w0) if w0 is not None and w1 is not None and w1 > w0 else _files_bytes(path)
    return written / (n * RECORD_BYTES)


async def _ours(path: str, n: int, appenders: int, per_append: int, batch: int) -> _Side:
    """Ingest through the facade: `appenders` coroutines each appending `per_append` records at a time."""
    payloads = [os.urandom(RECORD_BYTES) for _ in range(64)]
    w0 = _proc_write_bytes()
    aq = AsyncQueue(lambda: SqliteQueue(path), max_batch_records=batch)
    await aq.start()
    done = 0
    next_report = n // 4
    t0 = time.perf_counter()
    try:
        async def appender(k: int) -> None:
            nonlocal done, next_report
            i = k
            while True:
                start = done
                if start >= n:
                    return
                count = min(per_append, n - start)
                done += count  # claimed before awaiting, so appenders never overshoot n
                await aq.append([
                    NewRecord("telemetry", payloads[(i + j) % 64], time.time_ns(), Priority.TELEMETRY)
                    for j in range(count)
                ])
                i += count
                if done >= next_report:
                    _progress(f"ours: {done}/{n} records committed")
                    next_report += n // 4

        async with asyncio.TaskGroup() as tg:
            for k in range(appenders):
                tg.create_task(appender(k), name=f"bench-appender-{k}")
        elapsed = time.perf_counter() - t0
        stats = await aq.stats()
    finally:
        await aq.close()  # the final checkpoint is part of what this ingest writes (not of its time)
    if stats.depth != n:
        raise RuntimeError(f"ours: {stats.depth} records stored, expected {n}")
    _progress(f"ours: {n} records in {elapsed:.2f} s, {aq.commits} commits "
              f"({aq.appends / max(aq.commits, 1):.1f} appends per commit)")
    return _Side(n / elapsed, aq.commits, _amplification(path, w0, n))


def _raw(path: str, n: int, batch: int) -> _Side:
    """Raw executemany, same durability: WAL, synchronous=FULL, 4 KiB pages, `batch` rows per commit
    (SQLite's automatic checkpoint left at its default, so checkpoints are in its time as in ours)."""
    payloads = [os.urandom(RECORD_BYTES) for _ in range(64)]
    w0 = _proc_write_bytes()
    conn = sqlite3.connect(path, isolation_level=None)
    commits = 0
    try:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE records"
                     " (seq INTEGER PRIMARY KEY, ts_ns INTEGER NOT NULL, payload BLOB NOT NULL)")
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            rows = [(start + j + 1, time.time_ns(), payloads[(start + j) % 64])
                    for j in range(min(batch, n - start))]
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO records (seq, ts_ns, payload) VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")
            commits += 1
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    _progress(f"raw sqlite: {n} records in {elapsed:.2f} s, {commits} commits")
    return _Side(n / elapsed, commits, _amplification(path, w0, n))


async def _drain(path: str, n: int) -> float:
    async with AsyncQueue(lambda: SqliteQueue(path)) as aq:
        t0 = time.perf_counter()
        drained = 0
        while drained < n:
            batch = await aq.lease(200, time.monotonic(), max_bytes=256 * 1024)
            if not batch.records:
                break
            await aq.settle(batch, acked=batch.seqs)
            drained += len(batch.records)
        elapsed = time.perf_counter() - t0
    _progress(f"drain: {drained} records in {elapsed:.2f} s")
    return drained / elapsed


def _spread(values: list[float], fmt: str) -> str:
    return f"median {statistics.median(values):{fmt}} (min {min(values):{fmt}}, max {max(values):{fmt}})"


async def main(args: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="bench-store-", dir=args.dir)
    raws: list[_Side] = []
    ours: list[_Side] = []
    ratios: list[float] = []
    drain_per_s = 0.0
    try:
        _progress(f"{args.rounds} round(s) of {args.records} x {RECORD_BYTES} B records per side in {work}; "
                  f"{args.appenders} appenders x {args.per_append} records, batch {args.batch}, "
                  "synchronous=FULL")
        for r in range(args.rounds):
            # Side by side on fresh files in the same directory, in ABBA order (raw first in even rounds,
            # ours first in odd ones): the disk's fsync time drifts during a run and the second side of a
            # round may inherit the first one's writeback; a ratio of neighbours in alternating order
            # cancels most of both. Medians over rounds, with the spread printed next to them.
            _progress(f"round {r + 1}/{args.rounds}")
            raw_path, ours_path = os.path.join(work, f"raw{r}.db"), os.path.join(work, f"queue{r}.db")
            if r % 2 == 0:
                raw = await asyncio.to_thread(_raw, raw_path, args.records, args.batch)
                side = await _ours(ours_path, args.records, args.appenders, args.per_append, args.batch)
            else:
                side = await _ours(ours_path, args.records, args.appenders, args.per_append, args.batch)
                raw = await asyncio.to_thread(_raw, raw_path, args.records, args.batch)
            raws.append(raw)
            ours.append(side)
            ratios.append(side.per_s / raw.per_s)
            _progress(f"round {r + 1}: ours {side.per_s:.0f}/s raw {raw.per_s:.0f}/s ratio {ratios[-1]:.2f}; "
                      f"write amplification ours {side.write_amplification:.2f} "
                      f"raw {raw.write_amplification:.2f}")
            if r == args.rounds - 1:
                drain_per_s = await _drain(ours_path, args.records)
            for name in os.listdir(work):
                if name.startswith((f"raw{r}.db", f"queue{r}.db")):
                    os.unlink(os.path.join(work, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ingest_per_s = statistics.median(s.per_s for s in ours)
    raw_per_s = statistics.median(s.per_s for s in raws)
    ratio = statistics.median(ratios)
    amplification = statistics.median(s.write_amplification for s in ours)
    _progress(f"ratio {_spread(ratios, '.2f')} over {len(ratios)} rounds: "
              + " ".join(f"{x:.2f}" for x in ratios))
    _progress(f"ingest_per_s {_spread([s.per_s for s in ours], '.0f')}; "
              f"raw_sqlite_per_s {_spread([s.per_s for s in raws], '.0f')}")
    _progress(f"commits per round ours {statistics.median(s.commits for s in ours):.0f} "
              f"raw {statistics.median(s.commits for s in raws):.0f}; write_amplification ours "
              f"{_spread([s.write_amplification for s in ours], '.2f')}, raw "
              f"{_spread([s.write_amplification for s in raws], '.2f')}")
    print(f"bench store: ingest_per_s={ingest_per_s:.0f} raw_sqlite_per_s={raw_per_s:.0f} ratio={ratio:.2f} "
          f"drain_per_s={drain_per_s:.0f} write_amplification={amplification:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="edge-hil bench store", description=__doc__.splitlines()[0])
    add_args(parser)
    sys.exit(asyncio.run(main(parser.parse_args())))
