"""kill -9 a writer at random moments: every reported commit survives exactly once and seqs never go back.

Runs alternate between a writer on `SqliteQueue` directly and one with 8 concurrent appenders through
`AsyncQueue` (group commit, as the agent uses it)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store_forward.model import Batch
from store_forward.sqlite import SqliteQueue, open_readonly

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("_store_writer.py")
KILLS = 100

pytestmark = pytest.mark.system


def run_writer_until_killed(db: Path, run: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """Start a writer, SIGKILL it after a random number of reported records (0 = right after opening,
    possibly before or during the first commit); returns the (seq, run, counter) lines it reported."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # -S: the writer needs only the standard library and this repository; skipping site-packages
    # halves its start-up, which is most of the cost of 100 kills.
    proc = subprocess.Popen([sys.executable, "-S", str(WRITER), str(db), str(run), str(rng.randrange(2**32)),
                             "direct" if run % 2 == 0 else "facade"],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    assert proc.stdout is not None
    reported: list[tuple[int, int, int]] = []
    try:
        assert proc.stdout.readline() == "ready\n"
        target = rng.choice([0, 0, 1, 3, 10, 25, 60])
        while len(reported) < target:
            line = proc.stdout.readline()
            assert line, f"writer {run} exited early with {proc.poll()}"
            seq, r, counter = map(int, line.split())
            reported.append((seq, r, counter))
        time.sleep(rng.choice([0, 0, 0.0005, 0.002]))  # land the kill between or inside commits
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    # Lines the writer completed before it died were reported too; a torn last line was not.
    for line in proc.stdout.read().splitlines(keepends=True):
        if line.endswith("\n"):
            seq, r, counter = map(int, line.split())
            reported.append((seq, r, counter))
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return reported


def test_records_reported_committed_survive_sigkill_exactly_once_and_seqs_only_grow(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    db = tmp_path / "queue.db"
    SqliteQueue(db).close()
    floor_seq = 1  # every seq of the next run must be >= this (the high-water mark after the last run)
    generation = None
    for run in range(KILLS):
        reported = run_writer_until_killed(db, run, rng)
        with open_readonly(db) as store:
            stored = {r.seq: r for r in store.records()}
            snap = store.snapshot()
            assert store.quick_check() == ["ok"], f"seed {seed} run {run}"
            counted = store.recount()
        assert counted == (snap.depth_by_priority, snap.bytes_by_priority), f"seed {seed} run {run}"
        generation = generation or snap.generation
        assert snap.generation == generation
        this_run = sorted((int(r.payload.split(b".")[0].split(b":")[1]), seq)
                          for seq, r in stored.items() if r.payload.startswith(f"{run}:".encode()))
        for seq, r, counter in reported:
            assert seq in stored, f"seed {seed} run {run}: reported seq {seq} was lost"
            assert stored[seq].payload.split(b".")[0] == f"{r}:{counter}".encode()
        counters = [c for c, _ in this_run]
        assert len(counters) == len(set(counters)), f"seed {seed} run {run}: a record is stored twice"
        if run % 2 == 0:
            # One appender, whole transactions only: this run's counters form a gap-free prefix in seq order.
            assert counters == list(range(len(this_run))), f"seed {seed} run {run}"
        else:
            # Each of the 8 appenders awaits its append before the next: its counters form a prefix.
            for k in range(8):
                mine = sorted(c for c in counters if c % 8 == k)
                assert mine == list(range(k, k + 8 * len(mine), 8)), f"seed {seed} run {run} appender {k}"
        seqs_in_order = sorted(s for _, s in this_run)
        assert all(s >= floor_seq for s in seqs_in_order), f"seed {seed} run {run}: a seq went back"
        assert snap.next_seq > max(seqs_in_order, default=floor_seq - 1)
        floor_seq = snap.next_seq
        if run % 2 == 1:
            # Drain everything (the highest seqs included) so the next run proves they are not reused.
            with SqliteQueue(db) as q:
                batch: Batch = q.lease(1_000_000, now_s=0.0)
                q.settle(batch, acked=batch.seqs)
                assert q.stats().depth == 0
                assert q.stats().next_seq == floor_seq
