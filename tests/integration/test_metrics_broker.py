"""The broker metrics module: our broker's stats scraped over HTTP after real traffic and auth failures."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_broker.config import parse_config
from cloud_broker.metrics import render, serve_metrics
from cloud_broker.operator import OperatorError, connect
from cloud_broker.server import serve

pytestmark = pytest.mark.integration


def parsed(text: str) -> dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_broker_metrics_count_connections_messages_and_auth_failures() -> None:
    open_server = await serve(
        parse_config({"listeners": [{"host": "127.0.0.1", "port": 0}], "allow_anonymous": True})
    )
    closed_server = await serve(parse_config({"listeners": [{"host": "127.0.0.1", "port": 0}]}))
    try:
        port = open_server.ports["tcp"][0]
        async with (
            connect("127.0.0.1", port, client_id="sub") as sub,
            connect("127.0.0.1", port, client_id="pub") as pub,
        ):
            await sub.subscribe("t/#", 1)
            for i in range(3):
                await pub.publish(f"t/{i}", b"x", qos=1)
            for _ in range(3):
                await sub.next_message()
        with pytest.raises(OperatorError):
            await connect("127.0.0.1", closed_server.ports["tcp"][0], client_id="anon").__aenter__()

        bound: list[int] = []
        ready = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(
                serve_metrics(
                    "127.0.0.1",
                    0,
                    open_server.broker.stats,
                    on_bound=lambda p: (bound.append(p), ready.set()),
                ),
                name="broker-metrics",
            )
            await ready.wait()
            reader, writer = await asyncio.open_connection("127.0.0.1", bound[0])
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            raw = (await reader.read()).decode()
            writer.close()
            task.cancel()
        head, _, body = raw.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200 OK")
        m = parsed(body)
        assert m["fieldgate_broker_messages_received_total"] >= 3
        assert m["fieldgate_broker_messages_sent_total"] >= 3
        assert m["fieldgate_broker_connections_accepted_total"] >= 2
        assert "fieldgate_broker_clients_connected" in m
        assert (
            parsed(render(closed_server.broker.stats()).decode())["fieldgate_broker_auth_failures_total"] >= 1
        )
    finally:
        await open_server.close()
        await closed_server.close()
