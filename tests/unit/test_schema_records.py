"""Record and batch payloads: round trips in every encoding, and the idempotency keys they carry."""

from __future__ import annotations

import pytest

from uplink.schema.records import (
    CardRecord,
    EventRecord,
    PointValue,
    TelemetryRecord,
    decode_batch,
    decode_record,
    encode_batch,
    encode_record,
)
from uplink.schema.topics import AgentTopics, all_data_filter, parse_data_topic


def _card(n: int = 200) -> CardRecord:
    return CardRecord(
        device="well-001",
        acquired_at_ns=1_700_000_000_000_000_000,
        ts_ns=1_700_000_001_000_000_000,
        n_points=n,
        position_m=[i / 100 for i in range(n)],
        load_kn=[20.0 + i / 10 for i in range(n)],
        current_a=[10.0] * n,
        power_kw=[-2.3] * n,
        scalars={f"s{i}": float(i) for i in range(29)},
        quality="GOOD",
    )


def test_an_a11_card_record_carries_829_values() -> None:
    assert _card().value_count == 829


def test_a_card_without_power_meter_counts_only_measured_curves() -> None:
    card = CardRecord(**{**{f: getattr(_card(), f) for f in _card().__struct_fields__}, "power_kw": None})
    assert card.value_count == 29 + 3 * 200


@pytest.mark.parametrize(
    "record",
    [
        TelemetryRecord(
            "well-001",
            [
                PointValue("tubing_pressure_mpa", 3.25, "GOOD", 5),
                PointValue("run_status", None, "BAD", 6, "timeout"),
            ],
        ),
        _card(),
        EventRecord("agent", "gap", "evicted 10 records", 7, "warning"),
    ],
)
def test_records_survive_the_stored_encoding(record: object) -> None:
    assert decode_record(encode_record(record)) == record  # type: ignore[arg-type]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("with_properties", [True, False])
def test_a_batch_decodes_to_its_records_and_keys(
    encoding: str, compression: str, with_properties: bool
) -> None:
    stored = [encode_record(_card(50)), encode_record(TelemetryRecord("w", [PointValue("p", 1, "GOOD", 1)]))]
    payload, props = encode_batch(
        "pad-7",
        "gen-abc",
        [(41, 100, stored[0]), (42, 101, stored[1])],
        encoding=encoding,
        compression=compression,
    )  # type: ignore[arg-type]
    batch = decode_batch(payload, props if with_properties else None)
    assert (batch.agent, batch.gen) == ("pad-7", "gen-abc")
    assert [(i.seq, i.ts_ns) for i in batch.items] == [(41, 100), (42, 101)]
    assert batch.items[0].record == _card(50)
    assert dict(props.user_properties)["seq"] == "41-42"
    assert dict(props.user_properties)["gen"] == "gen-abc"


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_batch("a", "g", [])


def test_topics_confine_an_agent_to_its_own_tree() -> None:
    t = AgentTopics("pad-7")
    assert t.data("card") == "fg/v1/pad-7/data/card"
    assert parse_data_topic(t.data("card")) == ("pad-7", "card")
    assert parse_data_topic("fg/v1/pad-7/status") is None
    assert parse_data_topic("other/pad-7/data/card") is None
    assert all_data_filter() == "fg/v1/+/data/#"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "$SYS", "a b", "x" * 129])
def test_agent_ids_that_would_break_the_topic_tree_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        AgentTopics(bad)
