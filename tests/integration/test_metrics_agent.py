"""The agent's Prometheus endpoint, scraped over HTTP and parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hil.wellsite import Wellsite
from tests.integration.commands_support import (
    broker_process,
    config_doc,
    device,
    running_agent,
    wait_for,
    wellsite,
)

pytestmark = pytest.mark.integration
broker_port = pytest.fixture(name="broker_port")(broker_process)
site = pytest.fixture(name="site")(wellsite)


async def http_get(port: int, path: str) -> tuple[str, dict[str, str], str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_are_scraped_and_report_devices_queue_link_and_sent_bytes(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    dead = {**device(site, 1), "name": "ghost", "port": 1}  # port 1: refused at once
    doc = config_doc(tmp_path / "agent", broker_port, [device(site, 0), dead], metrics_port=0)
    async with running_agent(doc) as agent:
        await asyncio.wait_for(agent.metrics_bound.wait(), 5)
        assert agent.metrics_port
        assert agent.forwarder is not None
        await wait_for(lambda: agent.forwarder.stats.bytes_published > 0)
        status, headers, body = await http_get(agent.metrics_port, "/metrics")
        assert status.endswith("200 OK") and headers["Content-Type"].startswith("text/plain")
        m = samples(body)
        good = m[("fieldgate_agent_device_readings_total", (("device", "well-001"), ("quality", "GOOD")))]
        assert good > 0
        assert m[("fieldgate_agent_device_readings_total", (("device", "ghost"), ("quality", "BAD")))] > 0
        assert m[("fieldgate_agent_link_up", (("transport", "tcp"),))] == 1
        assert m[("fieldgate_agent_sent_bytes_total", ())] > 0
        assert m[("fieldgate_agent_publish_ack_seconds_count", ())] > 0
        assert ("fieldgate_agent_queue_depth_records", ()) in m
        assert ("fieldgate_agent_queue_oldest_age_seconds", ()) in m
        assert m[("fieldgate_agent_info", (("agent", "well-test-1"), ("config_version", "1")))] == 1
        assert m[("fieldgate_agent_healthy", ())] == 1
        # per-device poll outcomes and latency, from the driver's job hook
        await wait_for(lambda: "ghost" in agent.device_polls and "well-001" in agent.device_polls)
        _, _, body = await http_get(agent.metrics_port, "/metrics")
        m = samples(body)
        assert m[("fieldgate_agent_device_polls_total", (("device", "well-001"), ("result", "ok")))] > 0
        assert m[("fieldgate_agent_device_polls_total", (("device", "ghost"), ("result", "error")))] > 0
        assert m[("fieldgate_agent_device_poll_seconds_count", (("device", "well-001"),))] > 0
        status, _, _ = await http_get(agent.metrics_port, "/other")
        assert status.endswith("404 Not Found")
