"""Record and batch payloads that travel from agent to cloud (msgspec: MessagePack or JSON, optional zstd).

A *record* is what the durable queue stores: one device's values from one poll, one dynamometer card, or
one event. Records are stored MessagePack-encoded (compact on flash). A *batch* is what one MQTT PUBLISH
carries: records of one stream with their `(generation, seq)` keys. `generation` is the random id of the
agent's store and `seq` its monotonic counter, so `(generation, seq)` is the end-to-end idempotency key:
the cloud drops duplicates (at-least-once on the wire) and detects gaps.

MQTT 5 properties repeat the essentials so a broker rule can route without decoding the payload:
content type, and user properties `gen`, `seq` ("first-last"), `enc` (compression) and, on batches
drained from the backlog, `hist` = "1" (also `historical` in the payload: old data to fill in history,
never a reason for a live alarm).

A *gap notice* (`GapNotice`, stream "gap": `{prefix}/{agent}/data/gap`) says that `count` records of
`gen` with seqs in `first_seq..last_seq` will never be delivered, and why: `reason` "evicted" (dropped by
the queue's bounds policy; `detail` names the bound) or "lost" (damage found at start-up, salvaged into
a new generation). A seq missing without a gap notice is a real fault. Notices are delivered at least
once (the same `gap_id` of the same `gen` may repeat).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import zstandard

from uplink.mqtt.packets import Properties

SCHEMA_VERSION = 1
Encoding = Literal["msgpack", "json"]
Compression = Literal["none", "zstd"]

CONTENT_TYPES: dict[str, str] = {
    "msgpack": "application/vnd.fieldgate.batch.v1+msgpack",
    "json": "application/vnd.fieldgate.batch.v1+json",
}
GAP_CONTENT_TYPES: dict[str, str] = {
    "msgpack": "application/vnd.fieldgate.gap.v1+msgpack",
    "json": "application/vnd.fieldgate.gap.v1+json",
}
GAP_STREAM = "gap"  # the data stream gap notices travel on
Scalar = float | int | bool | str | None


class PointValue(msgspec.Struct, frozen=True, array_like=True):
    """One point's value: [name, value, quality, ts_ns, reason]. Array-like to keep it small."""

    name: str
    value: Scalar
    quality: str  # GOOD | UNCERTAIN | BAD
    ts_ns: int
    reason: str | None = None


class TelemetryRecord(msgspec.Struct, frozen=True, tag="telemetry"):
    device: str
    values: list[PointValue]
    clock: str = "synced"


class CardRecord(msgspec.Struct, frozen=True, tag="card"):
    """One atomic dynamometer card: the A11 layout's scalars plus four curves of n_points."""

    device: str
    acquired_at_ns: int
    ts_ns: int
    n_points: int
    position_m: list[float]
    load_kn: list[float]
    current_a: list[float] | None
    power_kw: list[float] | None
    scalars: dict[str, Scalar]
    quality: str
    reason: str | None = None
    clock: str = "synced"

    @property
    def value_count(self) -> int:
        curves = 2 + (self.current_a is not None) + (self.power_kw is not None)
        return len(self.scalars) + curves * self.n_points


class EventRecord(msgspec.Struct, frozen=True, tag="event"):
    source: str
    code: str
    message: str
    ts_ns: int
    severity: str = "info"
    data: dict[str, Any] | None = None  # structured details (e.g. the store's salvage report)


Record = TelemetryRecord | CardRecord | EventRecord

_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)


def encode_record(record: Record) -> bytes:
    return _record_encoder.encode(record)


def decode_record(data: bytes) -> Record:
    record: Record = _record_decoder.decode(data)
    return record


class BatchItem(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    ts_ns: int
    record: msgspec.Raw  # the stored record bytes, embedded without re-encoding (MessagePack)


class Batch(msgspec.Struct, frozen=True):
    v: int
    agent: str
    gen: str
    items: list[BatchItem]
    historical: bool = False  # drained from backlog rather than live


class DecodedItem(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    ts_ns: int
    record: Record


class DecodedBatch(msgspec.Struct, frozen=True):
    v: int
    agent: str
    gen: str
    items: list[DecodedItem]
    historical: bool = False


_mp_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
_mp_batch_decoder = msgspec.msgpack.Decoder(DecodedBatch)
_json_batch_decoder = msgspec.json.Decoder(DecodedBatch)


def encode_batch(
    agent: str,
    generation: str,
    items: list[tuple[int, int, bytes]],
    *,
    encoding: Encoding = "msgpack",
    compression: Compression = "none",
    historical: bool = False,
) -> tuple[bytes, Properties]:
    """Encode (seq, ts_ns, stored record bytes) items into one PUBLISH payload and its MQTT 5 properties."""
    if not items:
        raise ValueError("a batch needs at least one record")
    if encoding == "msgpack":
        batch = Batch(
            SCHEMA_VERSION,
            agent,
            generation,
            [BatchItem(s, t, msgspec.Raw(r)) for s, t, r in items],
            historical,
        )
        payload = _mp_encoder.encode(batch)
    else:
        decoded = DecodedBatch(
            SCHEMA_VERSION,
            agent,
            generation,
            [DecodedItem(s, t, decode_record(r)) for s, t, r in items],
            historical,
        )
        payload = _json_encoder.encode(decoded)
    if compression == "zstd":
        payload = zstandard.ZstdCompressor(level=3).compress(payload)
    seqs = [s for s, _, _ in items]
    user: tuple[tuple[str, str], ...] = (
        ("gen", generation),
        ("seq", f"{min(seqs)}-{max(seqs)}"),
        ("enc", compression),
    )
    if historical:
        user += (("hist", "1"),)
    props = Properties(
        content_type=CONTENT_TYPES[encoding],
        payload_format_indicator=1 if (encoding == "json" and compression == "none") else None,
        user_properties=user,
    )
    return payload, props


def decode_batch(payload: bytes, properties: Properties | None = None) -> DecodedBatch:
    """Decode a batch. Encoding and compression come from MQTT 5 properties, else are sniffed (3.1.1)."""
    compression = "none"
    encoding: str | None = None
    if properties is not None:
        for key, value in properties.user_properties:
            if key == "enc":
                compression = value
        if properties.content_type:
            encoding = "json" if properties.content_type.endswith("+json") else "msgpack"
    if compression == "zstd" or payload[:4] == b"\x28\xb5\x2f\xfd":
        payload = zstandard.ZstdDecompressor().decompress(payload)
    if encoding is None:
        encoding = "json" if payload[:1] == b"{" else "msgpack"
    if encoding == "json":
        return _json_batch_decoder.decode(payload)
    return _mp_batch_decoder.decode(payload)


class GapNotice(msgspec.Struct, frozen=True, kw_only=True):
    """Records that will never be delivered (see the module docstring); one per store gap row."""

    v: int
    agent: str
    gen: str
    # The store's id of the gap: with `gen`, the key to drop repeated notices. A record refused as too
    # large for the broker's Maximum Packet Size has no store gap row: its notice uses gap_id = -seq.
    gap_id: int
    first_seq: int
    last_seq: int
    count: int  # how many of the seqs in first..last are explained by this gap
    record_class: str | None  # "alarm" | "event" | "card" | "telemetry" | "bulk"; None: unknown
    reason: str  # "evicted" (by policy) | "lost" (damage) | "too_large" (can never fit one PUBLISH)
    detail: str  # the bound that evicted (max_bytes, max_records, max_age, disk_floor, disk_full) or damage
    recorded_ns: int


_gap_mp_decoder = msgspec.msgpack.Decoder(GapNotice)
_gap_json_decoder = msgspec.json.Decoder(GapNotice)


def encode_gap(notice: GapNotice, *, encoding: Encoding = "msgpack") -> tuple[bytes, Properties]:
    """One gap notice as a PUBLISH payload and its MQTT 5 properties (never compressed: it is small)."""
    payload = _mp_encoder.encode(notice) if encoding == "msgpack" else _json_encoder.encode(notice)
    props = Properties(
        content_type=GAP_CONTENT_TYPES[encoding],
        payload_format_indicator=1 if encoding == "json" else None,
        user_properties=(
            ("gen", notice.gen),
            ("seq", f"{notice.first_seq}-{notice.last_seq}"),
            ("gap", notice.reason),
        ),
    )
    return payload, props


def decode_gap(payload: bytes) -> GapNotice:
    """Decode a gap notice (JSON or MessagePack, sniffed)."""
    if payload[:1] == b"{":
        return _gap_json_decoder.decode(payload)
    return _gap_mp_decoder.decode(payload)
