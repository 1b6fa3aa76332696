"""Queue -> uplink: lease batches, publish them QoS 1, settle on PUBACK (at-least-once).

Theory of operation: up to `max_inflight_batches` leases are out at once, so publishes pipeline within
the broker's Receive Maximum instead of waiting one round trip per batch. Each lease is split by
record kind (one MQTT topic per stream), encoded (uplink.schema.records) and published; the records
of a publish that the broker acknowledged with a success code are settled (deleted durably), the
others are released for a later lease. The uplink keeps unacknowledged publishes across reconnects,
so a lease normally outlives link outages; leases are long because this process is the only
consumer and a crash forgets them anyway (everything unsettled is leased again after restart).
Delivery order: the queue leases oldest-first within priority, so a backlog drains in order.

Lanes (the durability contract in README.md): `lease_next` hands out live records first (enqueued within the
live window) and the backlog behind them, within the queue's byte-rate budget; a backlog batch is
published with `historical` set (payload field and user property `hist`), so the cloud fills in history
without raising live alarms from old data. When nothing may be leased, the loop sleeps until new records
are committed (`notify`), the backlog budget refills, or `idle_poll_s` passes.

Gaps: what the queue dropped without delivering (eviction by its bounds, rows lost to damage) waits in
the store as gap rows. While the link is up, a second task publishes each pending gap as a `GapNotice`
on the "gap" stream (QoS 1) and settles it on a successful PUBACK, so the cloud can tell "evicted by
policy" and "lost" from a real fault. A crash between PUBACK and settle repeats a notice (harmless: the
notice carries the store's gap id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from store_forward.model import Batch, Gap, StoredRecord
from store_forward.policy import BacklogBudget
from uplink.mqtt.packets import NO_PROPERTIES, Properties
from uplink.schema.records import (
    GAP_STREAM,
    SCHEMA_VERSION,
    Compression,
    Encoding,
    GapNotice,
    encode_batch,
    encode_gap,
)
from uplink.schema.topics import AgentTopics

log = logging.getLogger(__name__)

LEASE_S = 24 * 3600.0
REJECT_BACKOFF_S = 1.0
GAP_BATCH = 50  # gaps read per look at the store
GAP_POLL_S = 5.0  # gaps appear only when the store evicts: look this often while the link is up


class LeasingQueue(Protocol):
    """What the forwarder needs from store_forward.facade.AsyncQueue."""

    @property
    def backlog_budget(self) -> BacklogBudget: ...

    async def lease_next(
        self, max_items: int, now_s: float, *, max_bytes: int | None = None, lease_s: float = 60.0
    ) -> Batch: ...

    async def settle(self, batch: Batch, acked: Iterable[int], rejected: Iterable[int] = ()) -> None: ...

    async def pending_gaps(self, limit: int = 100) -> list[Gap]: ...

    async def settle_gap(self, gap_id: int) -> None: ...


class Publisher(Protocol):
    async def wait_connected(self) -> None: ...

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Properties = ...
    ) -> int: ...


@dataclass
class ForwarderStats:
    batches_published: int = 0
    records_settled: int = 0
    bytes_published: int = 0
    publishes_refused: int = 0
    historical_batches: int = 0  # acknowledged batches drained from the backlog
    gaps_announced: int = 0


class Forwarder:
    def __init__(
        self,
        queue: LeasingQueue,
        uplink: Publisher,
        topics: AgentTopics,
        *,
        batch_max_records: int = 200,
        batch_max_bytes: int = 256 * 1024,
        max_inflight_batches: int = 8,
        encoding: Encoding = "msgpack",
        compression: Compression = "none",
        idle_poll_s: float = 1.0,
        gap_poll_s: float = GAP_POLL_S,
        use_properties: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self._progress = progress or (lambda: None)
        self._queue = queue
        self._uplink = uplink
        self._topics = topics
        self._batch_max_records = batch_max_records
        self._batch_max_bytes = batch_max_bytes
        self._slots = asyncio.Semaphore(max_inflight_batches)
        self._encoding: Encoding = encoding
        self._compression: Compression = compression
        self._idle_poll_s = idle_poll_s
        self._gap_poll_s = gap_poll_s
        self._use_properties = use_properties  # MQTT 3.1.1 has no properties: the payload says it all
        self._monotonic = monotonic
        self._wake = asyncio.Event()
        self.stats = ForwarderStats()

    def notify(self) -> None:
        """New records were committed: look at the queue now rather than at the next idle poll."""
        self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._announce_gaps(), name="forward-gaps")
            n = 0
            while True:
                # Mark progress also while every slot waits for a link that is down: the watchdog must
                # judge this loop alive, not the link (see agent.watchdog).
                self._progress()
                try:
                    async with asyncio.timeout(self._idle_poll_s):
                        await self._slots.acquire()
                except TimeoutError:
                    continue
                try:
                    batch = await self._queue.lease_next(
                        self._batch_max_records,
                        self._monotonic(),
                        max_bytes=self._batch_max_bytes,
                        lease_s=LEASE_S,
                    )
                except BaseException:
                    self._slots.release()
                    raise
                if not batch.records:
                    self._slots.release()
                    await self._idle()
                    continue
                n += 1
                tg.create_task(self._send(batch), name=f"forward-batch-{n}")

    async def _idle(self) -> None:
        """Nothing leaseable: wait for a commit, the backlog budget, or the idle poll."""
        self._wake.clear()
        # wait_s is 0 when the budget is not what holds the backlog back (unlimited, or full): then
        # the queue is simply empty of free records and only a commit or a settle changes that.
        budget_s = self._queue.backlog_budget.wait_s(self._monotonic(), self._batch_max_bytes)
        wait_s = min(self._idle_poll_s, budget_s) if budget_s > 0 else self._idle_poll_s
        try:
            async with asyncio.timeout(wait_s):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _announce_gaps(self) -> None:
        while True:
            await self._uplink.wait_connected()
            gaps = await self._queue.pending_gaps(GAP_BATCH)
            for gap in gaps:
                await self._announce(gap)
            if len(gaps) < GAP_BATCH:
                await asyncio.sleep(self._gap_poll_s)

    async def _announce(self, gap: Gap) -> None:
        notice = GapNotice(
            v=SCHEMA_VERSION,
            agent=self._topics.agent_id,
            gen=gap.generation,
            gap_id=gap.gap_id,
            first_seq=gap.first_seq,
            last_seq=gap.last_seq,
            count=gap.count,
            record_class=None if gap.priority is None else gap.priority.name.lower(),
            reason=gap.reason.value,
            detail=gap.detail,
            recorded_ns=gap.recorded_ns,
        )
        payload, props = encode_gap(notice, encoding=self._encoding)
        if not self._use_properties:
            props = NO_PROPERTIES
        reason = await self._uplink.publish(self._topics.data(GAP_STREAM), payload, qos=1, properties=props)
        if reason >= 0x80:
            self.stats.publishes_refused += 1
            log.warning("forwarder: broker refused gap notice %d with reason 0x%02x; will retry",
                        gap.gap_id, reason)
            await asyncio.sleep(REJECT_BACKOFF_S)
            return
        await self._queue.settle_gap(gap.gap_id)
        self.stats.gaps_announced += 1
        log.info("forwarder: announced gap %d: %d record(s) of generation %s seq %d-%d %s (%s)",
                 gap.gap_id, gap.count, gap.generation, gap.first_seq, gap.last_seq, gap.reason.value,
                 gap.detail)

    async def _send(self, batch: Batch) -> None:
        try:
            by_kind: dict[str, list[StoredRecord]] = {}
            for rec in batch.records:
                by_kind.setdefault(rec.kind, []).append(rec)
            results = await asyncio.gather(
                *(self._publish(kind, recs, batch.historical) for kind, recs in by_kind.items())
            )
            acked = [seq for ok, seqs in results if ok for seq in seqs]
            await self._queue.settle(batch, acked)
            self.stats.records_settled += len(acked)
            if len(acked) < len(batch.records):
                await asyncio.sleep(REJECT_BACKOFF_S)
        finally:
            self._slots.release()

    async def _publish(self, kind: str, recs: list[StoredRecord], historical: bool) -> tuple[bool, list[int]]:
        generation = recs[0].generation
        payload, props = encode_batch(
            self._topics.agent_id,
            generation,
            [(r.seq, r.ts_ns, r.payload) for r in recs],
            encoding=self._encoding,
            compression=self._compression,
            historical=historical,
        )
        if not self._use_properties:
            props = NO_PROPERTIES
        reason = await self._uplink.publish(self._topics.data(kind), payload, qos=1, properties=props)
        seqs = [r.seq for r in recs]
        if reason >= 0x80:
            self.stats.publishes_refused += 1
            log.warning(
                "forwarder: broker refused batch %s seq %d-%d with reason 0x%02x; will retry",
                kind,
                seqs[0],
                seqs[-1],
                reason,
            )
            return False, seqs
        self.stats.batches_published += 1
        self.stats.historical_batches += historical
        self.stats.bytes_published += len(payload)
        return True, seqs
