"""System: the edge agent process on `transport = "auto"` against `cloud-broker run` with QUIC and TCP.

The agent's QUIC traffic goes through a UDP impairment proxy (in this process); TCP goes straight to the
broker. A simulated A11 wellsite (process) feeds the agent; a subscriber on TCP counts every record by
its (generation, seq) key; the agent's Prometheus endpoint tells which transport carries the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from hil.bench.uplink import BrokerPorts, make_bench_pki, start_broker_process
from hil.demo import Tally
from hil.impair import ImpairmentProxy
from hil.net import free_port, wait_tcp_listening
from hil.wellsite import endpoints_for
from store_forward.sqlite import SqliteQueue
from uplink.client import Uplink, UplinkConfig
from uplink.schema.topics import all_data_filter

pytestmark = pytest.mark.system

BIN = Path(sys.executable).parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Rig:
    tmp: Path
    ports: BrokerPorts
    proxy: ImpairmentProxy
    agent: asyncio.subprocess.Process
    metrics_port: int
    tally: Tally
    queue_path: Path
    watched: Path

    async def metrics(self) -> Samples:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.metrics_port)
        try:
            writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            await writer.drain()
            raw = (await reader.read()).decode()
        finally:
            writer.close()
        body = raw.split("\r\n\r\n", 1)[1]
        out: Samples = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    async def transport(self) -> str | None:
        with contextlib.suppress(OSError):
            for (name, labels), value in (await self.metrics()).items():
                if name == "fieldgate_agent_link_transport" and value == 1:
                    return dict(labels)["transport"]
        return None

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, tuple(sorted(labels.items()))), 0.0)

    async def until(self, check: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
        """Poll an async or sync condition on state owned by other processes, bounded."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    result = check()
                    if asyncio.iscoroutine(result):
                        result = await result
                    if result:
                        return
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout_s}s\n{self.agent_log()}") from None

    async def on(self, transport: str, timeout_s: float = 20.0) -> None:
        async def check() -> bool:
            return await self.transport() == transport

        await self.until(check, f"agent on {transport}", timeout_s)

    async def records_grow(self, by: int = 20) -> None:
        target = len(self.tally.seen) + by
        await self.until(lambda: len(self.tally.seen) >= target, f"{by} more records")

    def agent_log(self) -> str:
        path = self.tmp / "agent.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "--- agent log ---\n" + "\n".join(lines[-40:])

    async def stop_agent_and_count_lost(self) -> int:
        """SIGTERM (the agent drains its queue), then committed - delivered - still queued."""
        self.agent.send_signal(signal.SIGTERM)
        async with asyncio.timeout(40):
            rc = await self.agent.wait()
        assert rc == 0, self.agent_log()
        settled = -1
        while settled != len(self.tally.seen):  # the last deliveries reach the subscriber
            settled = len(self.tally.seen)
            await asyncio.sleep(0.5)
        queue = SqliteQueue(self.queue_path)
        try:
            stats = queue.stats()
        finally:
            queue.close()
        return stats.next_seq - 1 - len(self.tally.seen) - stats.depth


def agent_doc(tmp: Path, ports: BrokerPorts, quic_port: int, ca_file: str, wellsite_port: int,
              metrics_port: int, watched: Path) -> dict[str, object]:
    (name, host, port, unit), = endpoints_for(1, "127.0.0.1", wellsite_port)
    return {
        "agent": {"id": "pad-quic-01", "data_dir": str(tmp / "agent"), "drain_on_stop_s": 15.0},
        "uplink": {
            "host": "127.0.0.1",
            "port": ports.tcp,
            "transport": "auto",
            "ca_file": ca_file,
            "keep_alive_s": 2,
            "reconnect_initial_s": 0.2,
            "reconnect_max_s": 1.0,
            # QUIC through the proxy; a blackhole is noticed by the idle timeout and a handshake that
            # does not complete within 1 s sends the agent to TCP. The prober tries again every 1-2 s.
            "quic": {"port": quic_port, "idle_timeout_s": 2.0, "handshake_timeout_s": 1.0},
            "failover": {"probe_initial_s": 1.0, "probe_max_s": 2.0},
        },
        "metrics": {"port": metrics_port},
        "files": {"folders": [{"path": str(watched), "stable_s": 0.2, "after_upload": "archive"}]},
        "modbus": [{"name": name, "host": host, "port": port, "unit_id": unit, "profile": "a11",
                    "poll_interval_s": 0.2, "card": {"interval_s": 2.0}}],
    }


@contextlib.asynccontextmanager
async def rig(tmp: Path) -> AsyncIterator[Rig]:
    pki = make_bench_pki(tmp)
    logs = contextlib.ExitStack()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(logs)
        ports = await stack.enter_async_context(start_broker_process(
            pki, tmp, top_toml=f"data_dir = \"{tmp / 'broker'}\"\n",
            sections_toml="[file_transfer]\nenable = true\nfsync = false\n"))
        proxy = await stack.enter_async_context(ImpairmentProxy(("127.0.0.1", ports.quic), kind="udp"))
        ws_port = free_port()
        ws_log = logs.enter_context(_log_file(tmp / "wellsite.log"))
        wellsite = await asyncio.create_subprocess_exec(
            str(BIN / "edge-hil"), "wellsite", "--wells", "1", "--port", str(ws_port),
            "--card-interval-s", "2", stdout=ws_log, stderr=asyncio.subprocess.STDOUT)
        stack.push_async_callback(_end, wellsite)
        await asyncio.to_thread(wait_tcp_listening, ws_port, wellsite.pid, 20.0)

        tally = Tally()
        sub = Uplink(UplinkConfig(host="127.0.0.1", port=ports.tcp, client_id="subscriber", clean_start=True))
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        sub_task = tg.create_task(sub.run(), name="subscriber-link")
        await asyncio.wait_for(sub.wait_connected(), 10)
        await sub.subscribe([(all_data_filter(), 1)])

        async def consume() -> None:
            async for msg in sub.inbound():
                tally.add(msg)

        consumer = tg.create_task(consume(), name="subscriber")
        metrics_port = free_port()
        watched = tmp / "watched"
        watched.mkdir()
        doc = agent_doc(tmp, ports, proxy.port, pki.ca_file, ws_port, metrics_port, watched)
        config = tmp / "agent.toml"
        config.write_text(tomli_w.dumps(doc))
        agent_log = logs.enter_context(_log_file(tmp / "agent.log"))
        agent = await asyncio.create_subprocess_exec(
            str(BIN / "edge-agent"), "run", "--config", str(config), "--log-level", "info",
            stdout=agent_log, stderr=asyncio.subprocess.STDOUT)
        stack.push_async_callback(_end, agent)
        try:
            yield Rig(tmp, ports, proxy, agent, metrics_port, tally, tmp / "agent" / "queue.db", watched)
        finally:
            consumer.cancel()
            await sub.close()
            sub_task.cancel()


def _log_file(path: Path) -> IO[bytes]:
    return open(path, "wb")  # closed by the rig's exit stack


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


@pytest.mark.timeout(120)
async def test_an_auto_agent_falls_back_to_tcp_when_udp_is_blackholed_and_returns_to_quic_without_loss(
        tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.on("quic")
        await r.records_grow()

        r.proxy.blackhole(None)  # UDP gone both ways: QUIC times out, the failover picks TCP
        await r.on("tcp", timeout_s=30)
        assert await r.metric("fieldgate_agent_quic_fallbacks_total") >= 1
        await r.records_grow()  # and keeps delivering

        r.proxy.end_blackhole()  # the prober finds QUIC again and the agent leaves TCP
        await r.on("quic", timeout_s=30)
        await r.records_grow()

        assert await r.stop_agent_and_count_lost() == 0


@pytest.mark.timeout(120)
async def test_an_agent_on_quic_uploads_a_watched_file_on_a_data_stream_and_a_handover_does_not_reconnect(
        tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.on("quic")
        await r.records_grow()
        await r.until(lambda: r.metric("fieldgate_agent_file_stream", mode="stream"),
                      "files on a data stream")
        reconnects = await r.metric("fieldgate_agent_link_reconnects_total")

        payload = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: three segments of 1000 KiB
        (r.watched / "card-log.bin").write_bytes(payload)
        r.proxy.rebind()  # NAT rebinding / handover: the broker sees a new address mid-upload
        exports = tmp_path / "broker" / "file_transfer" / "exports"
        await r.until(lambda: any(exports.rglob("card-log.bin")), "the file exported by the broker")
        exported = next(exports.rglob("card-log.bin"))
        await r.until(lambda: exported.stat().st_size == len(payload), "the whole file")
        assert exported.read_bytes() == payload

        async def uploaded() -> bool:
            return await r.metric("fieldgate_agent_file_transfers_total", result="uploaded") == 1

        await r.until(uploaded, "the upload counted")
        await r.until(lambda: (r.watched / ".uploaded" / "card-log.bin").exists(), "the file archived")

        await r.records_grow()
        assert r.proxy.stats().rebinds == 1
        assert await r.transport() == "quic"
        assert await r.metric("fieldgate_agent_link_reconnects_total") == reconnects  # no MQTT reconnect
        assert await r.stop_agent_and_count_lost() == 0
