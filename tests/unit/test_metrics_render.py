"""The agent's metric families render to the text format that Prometheus' own parser reads back."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AckHistogram, DeviceCounters, Snapshot, render


def snapshot(**kw: object) -> Snapshot:
    ack = AckHistogram()
    for s in (0.003, 0.02, 0.02, 4.0, 99.0):
        ack.observe(s)
    base: dict[str, object] = dict(
        agent_id="w1",
        config_version='v"1',
        uptime_s=12.5,
        devices={"rtu\\1": DeviceCounters(good=5, bad=2, last_good_monotonic_s=90.0)},
        now_monotonic_s=100.0,
        queue_depth=3,
        queue_bytes=300,
        queue_oldest_age_s=4.5,
        queue_appended_total=10,
        queue_evicted_total=0,
        link_up=True,
        transport="tcp",
        reconnects=1,
        publish_ack=ack,
        bytes_published=1234,
        batches_published=7,
        records_settled=7,
        publishes_refused=0,
        readings_in=7,
        readings_dropped=0,
        commands_by_code={"ok": 2},
        clock_synced=False,
        clock_steps=1,
        healthy=True,
        file_transfers={"done": 1},
    )
    return Snapshot(**{**base, **kw})  # type: ignore[arg-type]


def parsed(data: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(data.decode())
        for s in fam.samples
    }


def test_a_snapshot_renders_labels_escaped_and_values_intact() -> None:
    m = parsed(render(snapshot()))
    assert m[("fieldgate_agent_info", (("agent", "w1"), ("config_version", 'v"1')))] == 1
    assert m[("fieldgate_agent_device_readings_total", (("device", "rtu\\1"), ("quality", "BAD")))] == 2
    assert m[("fieldgate_agent_device_last_good_age_seconds", (("device", "rtu\\1"),))] == 10.0
    assert m[("fieldgate_agent_queue_oldest_age_seconds", ())] == 4.5
    assert m[("fieldgate_agent_clock_synced", ())] == 0
    assert m[("fieldgate_agent_file_transfers_total", (("result", "done"),))] == 1


def test_the_ack_histogram_is_cumulative_with_an_inf_bucket() -> None:
    m = parsed(render(snapshot()))
    assert m[("fieldgate_agent_publish_ack_seconds_bucket", (("le", "0.005"),))] == 1
    assert m[("fieldgate_agent_publish_ack_seconds_bucket", (("le", "0.025"),))] == 3
    assert m[("fieldgate_agent_publish_ack_seconds_bucket", (("le", "5.0"),))] == 4
    assert m[("fieldgate_agent_publish_ack_seconds_bucket", (("le", "+Inf"),))] == 5
    assert m[("fieldgate_agent_publish_ack_seconds_count", ())] == 5
    assert abs(m[("fieldgate_agent_publish_ack_seconds_sum", ())] - 103.043) < 1e-9
