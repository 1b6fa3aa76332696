"""`edge-hil demo`: the whole path on one box: wells, agent, durable queue, MQTT, broker, subscriber.

Starts, on free loopback ports, the cloud broker (process), a simulated A11 wellsite (process), a
subscriber (in this process, our own MQTT client) and the edge agent (process); shows live progress;
then stops the agent (which drains its queue), and accounts for every record by its (generation, seq)
key: delivered once, delivered twice (duplicate, allowed on the wire and dropped here), still queued,
or lost. Ends with one line

    demo: wells=16 cards=C records=R delivered=D lost=L duplicates=U p50_ms=X p99_ms=Y

and exits non-zero if anything was lost. `--kill-agent-at S` SIGKILLs the agent S seconds in and
restarts it, to show that a crash loses no committed record.

`--transport` picks the agent's uplink: "auto" (the default: MQTT over QUIC, TCP when QUIC cannot be
had), "quic" or "tcp". For QUIC the demo makes a throwaway CA and broker certificate in its workdir and
starts the broker with a QUIC listener beside TCP; the agent's retained birth message says which
transport carries its session, and the demo prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import tomli_w

from hil.net import free_port, wait_tcp_listening
from store_forward.sqlite import SqliteQueue
from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.packets import Publish
from uplink.schema.commands import AgentStatus
from uplink.schema.records import CardRecord, decode_batch, decode_gap
from uplink.schema.topics import AgentTopics, all_data_filter, parse_data_topic

BIN = Path(sys.executable).parent


@dataclass
class Tally:
    """What the subscriber saw, keyed by (generation, seq)."""

    seen: set[tuple[str, int]] = field(default_factory=set)
    duplicates: int = 0
    cards: int = 0
    values: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batches: int = 0
    undecodable: int = 0
    gap_seqs: set[tuple[str, int]] = field(default_factory=set)  # announced as evicted/lost/too large

    def add(self, msg: Publish) -> None:
        parsed = parse_data_topic(msg.topic)
        if parsed is None:
            return
        if parsed[1] == "gap":
            try:
                gap = decode_gap(msg.payload)
            except (msgspec.DecodeError, ValueError):
                self.undecodable += 1
                return
            self.gap_seqs.update((gap.gen, seq) for seq in range(gap.first_seq, gap.last_seq + 1))
            return
        now_ns = time.time_ns()
        try:
            batch = decode_batch(msg.payload, msg.properties)
        except (msgspec.DecodeError, ValueError):
            self.undecodable += 1
            return
        self.batches += 1
        for item in batch.items:
            key = (batch.gen, item.seq)
            if key in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(key)
            self.latencies_ms.append((now_ns - item.ts_ns) / 1e6)
            rec = item.record
            if isinstance(rec, CardRecord):
                self.cards += 1
                self.values += rec.value_count
            elif hasattr(rec, "values"):
                self.values += len(rec.values)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass(frozen=True)
class DemoLink:
    """How the demo's agent reaches the broker: transport, TCP port, QUIC port and the CA to trust."""

    transport: str = "tcp"
    tcp_port: int = 1883
    quic_port: int | None = None
    ca_file: str | None = None


def agent_config(
    workdir: Path,
    agent_id: str,
    broker_port: int,
    endpoints: list[tuple[str, str, int, int]],
    card_interval_s: float,
    link: DemoLink | None = None,
) -> Path:
    devices = [
        {
            "name": name,
            "host": host,
            "port": port,
            "unit_id": unit,
            "profile": "a11",
            "poll_interval_s": 1.0,
            "card": {"interval_s": card_interval_s},
        }
        for name, host, port, unit in endpoints
    ]
    doc = {
        "agent": {
            "id": agent_id,
            "data_dir": str(workdir / "agent"),
            "log_level": "info",
            "drain_on_stop_s": 15.0,
        },
        "uplink": {
            "host": "127.0.0.1",
            "port": broker_port,
            "keep_alive_s": 10,
            "reconnect_initial_s": 0.2,
            "reconnect_max_s": 2.0,
        },
        "modbus": devices,
    }
    if link is not None and link.transport != "tcp":
        assert link.quic_port is not None and link.ca_file is not None
        uplink = doc["uplink"]
        assert isinstance(uplink, dict)
        uplink.update(
            transport=link.transport,
            ca_file=link.ca_file,
            quic={"port": link.quic_port, "handshake_timeout_s": 3.0},
            failover={"probe_initial_s": 5.0, "probe_max_s": 30.0},
        )
    path = workdir / "agent.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


class Procs:
    """Child processes of the demo, ended together."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout_s: float = 30.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name, timeout_s=5)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fieldgate-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Procs(workdir)
    try:
        return await _run(args, workdir, procs)
    finally:
        procs.stop_all()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _say(msg: str) -> None:
    print(msg, flush=True)


async def _run(args: argparse.Namespace, workdir: Path, procs: Procs) -> int:
    broker_port = free_port()
    _say(f"demo: workdir {workdir}")
    argv = [str(BIN / "cloud-broker"), "run", "--tcp", f"127.0.0.1:{broker_port}",
            "--data", str(workdir / "broker"), "--allow-anonymous"]
    link = DemoLink("tcp", broker_port)
    if args.transport != "tcp":
        from hil.bench.uplink import make_bench_pki

        pki_dir = workdir / "pki"
        pki_dir.mkdir(exist_ok=True)
        pki = await asyncio.to_thread(make_bench_pki, pki_dir)  # throwaway CA + broker certificate
        quic_port = free_port("udp")
        argv += ["--quic", f"127.0.0.1:{quic_port}", "--cert", pki.cert_file, "--key", pki.key_file]
        link = DemoLink(args.transport, broker_port, quic_port, pki.ca_file)
    broker = procs.start("broker", argv)
    await asyncio.to_thread(wait_tcp_listening, broker_port, broker.pid, 20.0)
    quic = f", QUIC on 127.0.0.1:{link.quic_port} (udp)" if link.quic_port is not None else ""
    _say(f"demo: cloud broker listening on 127.0.0.1:{broker_port}{quic} (pid {broker.pid})")

    ws_port = free_port()
    wellsite = procs.start(
        "wellsite",
        [
            str(BIN / "edge-hil"),
            "wellsite",
            "--wells",
            str(args.wells),
            "--port",
            str(ws_port),
            "--card-interval-s",
            str(args.card_interval_s),
        ],
    )
    await asyncio.to_thread(wait_tcp_listening, ws_port, wellsite.pid, 20.0)
    from hil.wellsite import endpoints_for

    endpoints = endpoints_for(args.wells, "127.0.0.1", ws_port)
    _say(f"demo: wellsite with {args.wells} A11 wells on 127.0.0.1:{ws_port} (pid {wellsite.pid})")

    tally = Tally()
    sub = Uplink(
        UplinkConfig(
            host="127.0.0.1", port=broker_port, client_id="demo-subscriber", clean_start=True, keep_alive_s=10
        )
    )
    async with asyncio.TaskGroup() as tg:
        sub_task = tg.create_task(sub.run(), name="subscriber-link")
        await asyncio.wait_for(sub.wait_connected(), 10)
        agent_id = "demo-pad-01"
        status_topic = AgentTopics(agent_id).status
        await sub.subscribe([(all_data_filter(), 1), (status_topic, 1)])
        transports: list[str] = []

        async def consume() -> None:
            async for msg in sub.inbound():
                if msg.topic == status_topic:
                    _birth(msg, transports)
                else:
                    tally.add(msg)

        consumer = tg.create_task(consume(), name="subscriber")
        cfg_path = agent_config(workdir, agent_id, broker_port, endpoints, args.card_interval_s, link)
        agent_argv = [str(BIN / "edge-agent"), "run", "--config", str(cfg_path)]
        agent = procs.start("agent", agent_argv)
        _say(f"demo: edge agent started (pid {agent.pid}), config {cfg_path}")

        t0 = time.monotonic()
        killed = False
        last_print = 0.0
        while (elapsed := time.monotonic() - t0) < args.duration:
            await asyncio.sleep(0.25)
            if args.kill_agent_at is not None and not killed and elapsed >= args.kill_agent_at:
                procs.kill("agent")
                killed = True
                _say(f"demo: t={elapsed:4.1f}s SIGKILL agent; restarting it")
                agent = procs.start("agent", agent_argv)
            if "agent" in procs.procs and procs.procs["agent"].poll() is not None:
                _say("demo: the agent exited unexpectedly:\n" + procs.tail("agent"))
                return 2
            if elapsed - last_print >= 1.0:
                last_print = elapsed
                p50 = percentile(tally.latencies_ms[-2000:], 50)
                _say(
                    f"demo: t={elapsed:4.1f}s cards={tally.cards} records={len(tally.seen)} "
                    f"values={tally.values} duplicates={tally.duplicates} p50_ms={p50:.0f}"
                )

        _say("demo: stopping the agent (it drains its queue first)")
        rc = await asyncio.to_thread(procs.stop, "agent", 60.0)
        if rc != 0:
            _say(f"demo: agent exited with {rc}:\n" + procs.tail("agent"))
        # Let the last in-flight deliveries reach the subscriber.
        quiet_since = time.monotonic()
        last_n = len(tally.seen)
        while time.monotonic() - quiet_since < 1.0:
            await asyncio.sleep(0.1)
            if len(tally.seen) != last_n:
                last_n, quiet_since = len(tally.seen), time.monotonic()
        consumer.cancel()
        await sub.close()
        sub_task.cancel()

    queue = SqliteQueue(workdir / "agent" / "queue.db")
    try:
        stats = queue.stats()
    finally:
        queue.close()
    committed = stats.next_seq - 1  # a fresh store numbers its records 1..next_seq-1
    delivered = len(tally.seen)
    remaining = stats.depth
    announced = len(tally.gap_seqs - tally.seen)  # evicted by policy and said so: not silent loss
    lost = committed - delivered - remaining - announced
    if announced:
        _say(f"demo: {announced} record(s) announced as gaps (evicted by policy, not silent loss)")
    if remaining:
        _say(f"demo: {remaining} record(s) still queued durably on the agent (not lost; sent on next start)")
    if tally.undecodable:
        _say(f"demo: {tally.undecodable} undecodable batch(es)")
    _say(f"demo: values delivered={tally.values} batches={tally.batches} generation={stats.generation}")
    _say(
        f"demo: wells={args.wells} cards={tally.cards} records={committed} delivered={delivered} lost={lost} "
        f"duplicates={tally.duplicates} p50_ms={percentile(tally.latencies_ms, 50):.1f} "
        f"p99_ms={percentile(tally.latencies_ms, 99):.1f}"
    )
    if committed == 0 or tally.cards == 0:
        _say("demo: FAILED: nothing (or no card) made it through; see logs in " + str(workdir))
        return 1
    return 1 if lost > 0 or remaining > 0 else 0


def _birth(msg: Publish, seen: list[str]) -> None:
    """Print the transport from the agent's birth message each time it changes."""
    try:
        status = msgspec.json.decode(msg.payload, type=AgentStatus)
    except msgspec.DecodeError:
        return
    if status.state != "online" or status.transport is None:
        return
    if not seen or seen[-1] != status.transport:
        seen.append(status.transport)
        over = "MQTT over QUIC" if status.transport == "quic" else f"MQTT over {status.transport.upper()}"
        _say(f"demo: agent {status.agent} online, {over}")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on loopback and account for every record")
    p.add_argument("--wells", type=int, default=16, help="simulated A11 wells (default 16)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of acquisition (default 30)")
    p.add_argument(
        "--card-interval-s",
        type=float,
        default=5.0,
        help="card interval of the simulated wells and the agent (default 5 s, compressed time)",
    )
    p.add_argument(
        "--kill-agent-at",
        type=float,
        default=None,
        metavar="S",
        help="SIGKILL the agent S seconds in and restart it (crash-durability demo)",
    )
    p.add_argument(
        "--transport",
        choices=["auto", "quic", "tcp"],
        default="auto",
        help="the agent's uplink: auto (MQTT over QUIC, TCP fallback; the default), quic or tcp",
    )
    p.add_argument("--workdir", help="keep configs, logs and the queue here (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.set_defaults(main=run_demo)
