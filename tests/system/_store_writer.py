"""Child process for test_store_kill: appends records forever and reports each committed seq on stdout.

Usage: python _store_writer.py DB RUN SEED MODE. MODE "direct" appends through `SqliteQueue`; "facade"
runs 8 concurrent appenders through `AsyncQueue` (group commit, as the agent does). Prints "ready" once
the store is open, then one line "SEQ RUN COUNTER" per record, only after the append that stored it
returned (i.e. committed). The payload of each record is "RUN:COUNTER" plus padding, so the parent can
match what it finds to what was reported. Counters are unique per run (each appender owns a residue
class), so "exactly once" is checkable.
"""

from __future__ import annotations

import asyncio
import random
import sys

from store_forward.facade import AsyncQueue
from store_forward.model import NewRecord, Priority
from store_forward.sqlite import SqliteQueue

APPENDERS = 8


def make(run: int, counters: list[int], rng: random.Random) -> list[NewRecord]:
    return [
        NewRecord("value", f"{run}:{c}".encode() + b"." * rng.randint(0, 600), c, rng.choice(list(Priority)))
        for c in counters
    ]


def direct(db: str, run: int, rng: random.Random) -> None:
    q = SqliteQueue(db)  # synchronous=FULL, the production default
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    counter = 0
    while True:
        n = rng.randint(1, 4)
        seqs = q.append(make(run, list(range(counter, counter + n)), rng))
        out.write("".join(f"{seq} {run} {counter + i}\n" for i, seq in enumerate(seqs)))
        out.flush()
        counter += n


async def facade(db: str, run: int, rng: random.Random) -> None:
    out = sys.stdout
    async with AsyncQueue(lambda: SqliteQueue(db)) as aq:
        out.write("ready\n")
        out.flush()

        async def appender(k: int) -> None:
            counter = k
            while True:
                n = rng.randint(1, 3)
                counters = [counter + APPENDERS * i for i in range(n)]
                seqs = await aq.append(make(run, counters, rng))
                out.write("".join(f"{seq} {run} {c}\n" for seq, c in zip(seqs, counters, strict=True)))
                out.flush()
                counter += APPENDERS * n

        async with asyncio.TaskGroup() as tg:
            for k in range(APPENDERS):
                tg.create_task(appender(k), name=f"appender-{k}")


def main() -> None:
    db, run, seed, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rng = random.Random(seed)
    if mode == "direct":
        direct(db, run, rng)
    else:
        asyncio.run(facade(db, run, rng))


if __name__ == "__main__":
    main()
