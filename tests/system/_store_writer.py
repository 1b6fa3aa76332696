"""Child process for test_store_kill: appends records forever and reports each committed seq on stdout.

Usage: python _store_writer.py DB RUN SEED. Prints "ready" once the store is open, then one line
"SEQ RUN COUNTER" per record, only after the append that stored it returned (i.e. committed). The
payload of each record is "RUN:COUNTER", so the parent can match what it finds to what was reported.
"""

from __future__ import annotations

import random
import sys

from store_forward.model import NewRecord, Priority
from store_forward.sqlite import SqliteQueue


def main() -> None:
    db, run, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    q = SqliteQueue(db)  # synchronous=FULL, the production default
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    counter = 0
    while True:
        n = rng.randint(1, 4)
        records = [
            NewRecord("value", f"{run}:{counter + i}".encode() + b"." * rng.randint(0, 600), counter + i,
                      rng.choice(list(Priority)))
            for i in range(n)
        ]
        seqs = q.append(records)
        out.write("".join(f"{seq} {run} {counter + i}\n" for i, seq in enumerate(seqs)))
        out.flush()
        counter += n


if __name__ == "__main__":
    main()
