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

What the broker says (PUBACK reason codes, and what the link refuses before sending):
- success (< 0x80): the records are settled (deleted). 0x10 "no matching subscribers" is a success code
  and settles too by default (`settle_on_no_subscribers`): the broker took the message and a deployment
  whose ingest is a rule or integration (not a subscriber) must not retry forever and fill the store.
  Set it False where a subscriber is the only ingest: then 0x10 is handled like a refusal and the
  records are kept until somebody listens.
- refused (>= 0x80, e.g. 0x97 quota exceeded: every subscriber's queue was full and the broker dropped
  the message; 0x87 not authorized): the records are kept (released for a later lease) and the forwarder
  backs off, doubling from `refused_backoff_initial_s` to `refused_backoff_max_s`, reset by the next
  success. A link that cannot carry a message at all (QoS 1 above the broker's Maximum QoS) is treated
  the same way, loudly: the records wait for a broker that can take them.
- too large (the encoded PUBLISH exceeds the broker's Maximum Packet Size from CONNACK; JSON encoding
  may double a MessagePack batch): the batch is split in halves and each half sent in order, down to
  single records. A single record that can never fit is settled as rejected and announced first as a
  `GapNotice` with reason "too_large" (count 1, first_seq = last_seq = its seq; gap_id = -seq, since no
  store gap row exists, and negative ids never collide with the store's), so the cloud can tell the
  missing seq from a fault. Nothing here may end the forwarder: a refusal is a condition, not a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from store_forward.model import Batch, Gap, StoredRecord
from store_forward.policy import BacklogBudget
from uplink.backoff import Backoff
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import NO_PROPERTIES, Properties, ReasonCode
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
REFUSED_BACKOFF_INITIAL_S = 1.0
REFUSED_BACKOFF_MAX_S = 30.0
TOO_LARGE = "too_large"  # GapNotice.reason of a record no PUBLISH to this broker can carry
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
    batches_split: int = 0  # publishes over the broker's Maximum Packet Size, sent again in halves
    records_too_large: int = 0  # single records that can never fit: settled as rejected, announced


@dataclass
class _Delivery:
    """What became of some records of a lease: acked (settle), rejected (settle as rejected), else kept."""

    acked: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    refused: bool = False  # the broker (or link) refused: keep the rest and back off

    def then(self, other: _Delivery) -> _Delivery:
        return _Delivery(
            self.acked + other.acked, self.rejected + other.rejected, self.refused or other.refused
        )


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
        settle_on_no_subscribers: bool = True,
        refused_backoff_initial_s: float = REFUSED_BACKOFF_INITIAL_S,
        refused_backoff_max_s: float = REFUSED_BACKOFF_MAX_S,
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
        self._settle_on_no_subscribers = settle_on_no_subscribers
        # Shared by every batch and the gap task: a broker that refuses is refusing all of us.
        self._refused_backoff = Backoff(refused_backoff_initial_s, refused_backoff_max_s, 2.0, "equal")
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
        if not await self._publish_notice(notice):
            await self._back_off()
            return
        await self._queue.settle_gap(gap.gap_id)
        self.stats.gaps_announced += 1
        log.info("forwarder: announced gap %d: %d record(s) of generation %s seq %d-%d %s (%s)",
                 gap.gap_id, gap.count, gap.generation, gap.first_seq, gap.last_seq, gap.reason.value,
                 gap.detail)

    async def _publish_notice(self, notice: GapNotice) -> bool:
        """Publish one gap notice; True once the broker acknowledged it with a success code."""
        payload, props = encode_gap(notice, encoding=self._encoding)
        if not self._use_properties:
            props = NO_PROPERTIES
        what = f"gap notice {notice.gap_id} ({notice.reason})"
        reason = await self._publish(self._topics.data(GAP_STREAM), payload, props, what)
        return self._delivered(reason, what)

    async def _send(self, batch: Batch) -> None:
        try:
            by_kind: dict[str, list[StoredRecord]] = {}
            for rec in batch.records:
                by_kind.setdefault(rec.kind, []).append(rec)
            async with asyncio.TaskGroup() as tg:
                parts = [
                    tg.create_task(self._deliver(kind, recs, batch.historical), name=f"forward-{kind}")
                    for kind, recs in by_kind.items()
                ]
            outcome = _Delivery()
            for part in parts:
                outcome = outcome.then(part.result())
            await self._queue.settle(batch, outcome.acked, outcome.rejected)
            self.stats.records_settled += len(outcome.acked)
            if outcome.refused:
                await self._back_off()
            else:
                self._refused_backoff.reset()
        finally:
            self._slots.release()

    async def _back_off(self) -> None:
        await asyncio.sleep(self._refused_backoff.next_delay())

    async def _deliver(self, kind: str, recs: list[StoredRecord], historical: bool) -> _Delivery:
        """Publish recs as one batch, or in order as smaller ones when it is over the Maximum Packet Size."""
        seqs = [r.seq for r in recs]
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
        what = f"batch {kind} seq {seqs[0]}-{seqs[-1]}"
        reason = await self._publish(self._topics.data(kind), payload, props, what)
        if reason == ReasonCode.PACKET_TOO_LARGE:
            if len(recs) == 1:
                return await self._reject_too_large(recs[0], len(payload))
            self.stats.batches_split += 1
            half = len(recs) // 2
            log.info("forwarder: %s (%d records, %d payload bytes) is over the broker's maximum packet "
                     "size; sending it in halves", what, len(recs), len(payload))
            first = await self._deliver(kind, recs[:half], historical)
            if first.refused:
                return first  # keep the order: the second half waits with the first
            return first.then(await self._deliver(kind, recs[half:], historical))
        if not self._delivered(reason, what):
            return _Delivery(refused=True)
        self.stats.batches_published += 1
        self.stats.historical_batches += historical
        self.stats.bytes_published += len(payload)
        return _Delivery(acked=seqs)

    async def _reject_too_large(self, rec: StoredRecord, encoded_bytes: int) -> _Delivery:
        """A lone record no PUBLISH to this broker can carry: announce it, then settle it as rejected.

        Announced first: a crash in between re-leases the record and repeats the notice (same gap_id),
        never the other way round (a record gone without a word)."""
        notice = GapNotice(
            v=SCHEMA_VERSION,
            agent=self._topics.agent_id,
            gen=rec.generation,
            gap_id=-rec.seq,
            first_seq=rec.seq,
            last_seq=rec.seq,
            count=1,
            record_class=rec.priority.name.lower(),
            reason=TOO_LARGE,
            detail=(f"{rec.kind} record of {len(rec.payload)} bytes encodes to a {encoded_bytes}-byte "
                    f"payload, over the broker's maximum packet size"),
            recorded_ns=time.time_ns(),
        )
        if not await self._publish_notice(notice):
            return _Delivery(refused=True)
        self.stats.records_too_large += 1
        self.stats.gaps_announced += 1
        log.error("forwarder: %s record seq %d of generation %s (%d bytes) can never fit the broker's "
                  "maximum packet size; dropped and announced as a too_large gap",
                  rec.kind, rec.seq, rec.generation, len(rec.payload))
        return _Delivery(rejected=[rec.seq])

    async def _publish(self, topic: str, payload: bytes, props: Properties, what: str) -> int:
        """Publish QoS 1 and return the PUBACK reason code; what the link refuses to send comes back as
        its reason code too (PACKET_TOO_LARGE, QOS_NOT_SUPPORTED...), never as an exception."""
        try:
            return await self._uplink.publish(topic, payload, qos=1, properties=props)
        except LocalProtocolError as exc:
            if exc.reason_code == ReasonCode.PACKET_TOO_LARGE:
                return ReasonCode.PACKET_TOO_LARGE
            log.error("forwarder: the link cannot send %s: %s; keeping it", what, exc)
            return exc.reason_code if exc.reason_code >= 0x80 else ReasonCode.UNSPECIFIED_ERROR

    def _delivered(self, reason: int, what: str) -> bool:
        """Whether a PUBACK reason code settles the message (see the module docstring)."""
        if reason < 0x80 and (reason != ReasonCode.NO_MATCHING_SUBSCRIBERS or self._settle_on_no_subscribers):
            self._refused_backoff.reset()
            return True
        self.stats.publishes_refused += 1
        why = "no subscriber" if reason == ReasonCode.NO_MATCHING_SUBSCRIBERS else "refused"
        log.warning("forwarder: broker %s %s (reason 0x%02x); keeping it, will retry", why, what, reason)
        return False
