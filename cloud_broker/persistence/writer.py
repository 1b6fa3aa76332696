"""The journal writer: one thread that applies the core's intent batches to storage in group commits.

Theory of operation. The event loop hands each drained journal batch to `submit` (never blocks). The
thread takes every batch waiting, applies them in order in one transaction (a group commit: under load
one fsync covers many batches), then reports the highest batch number it made durable through
`on_committed`, which the owner marshals back to the loop (`call_soon_threadsafe`). If storage fails,
`on_failed` gets the error once and the writer stops taking batches: the broker can no longer keep its
durability promise, so the owner must stop serving (acks held behind the failed batch are never sent).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from cloud_broker.core.persistence import Intent, Persistence

log = logging.getLogger("cloud_broker.persistence")

_STOP = None


class JournalWriter:
    def __init__(self, store: Persistence, on_committed: Callable[[int], object],
                 on_failed: Callable[[Exception], object], name: str = "broker-journal") -> None:
        self._store = store
        self._on_committed = on_committed
        self._on_failed = on_failed
        self._queue: queue.SimpleQueue[tuple[int, Sequence[Intent]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failed = False
        self.commits = 0  # transactions committed (each may cover many batches)
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, batch: int, intents: Sequence[Intent]) -> None:
        """Queue a batch for the next group commit (called on the event loop; never blocks)."""
        self._queue.put((batch, intents))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Commit what was submitted, then end the thread (blocks: call it off the loop or at exit)."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        get = self._queue.get
        stopping = False
        while not stopping:
            item = get()
            group: list[Intent] = []
            last = 0
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    batch, intents = item
                    group.extend(intents)
                    last = batch
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if last == 0 or self._failed:
                continue
            try:
                # wall = monotonic + offset: the core's times are monotonic (see core.persistence).
                self._store.apply(group, time.time() - time.monotonic())
            except Exception as exc:  # noqa: BLE001 - any storage failure ends durability: report it, stop
                self._failed = True
                log.critical("broker state could not be written: %s", exc)
                self._on_failed(exc)
                continue
            self.commits += 1
            self.batches = last
            self._on_committed(last)
