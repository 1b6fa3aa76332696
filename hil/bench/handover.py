"""`edge-hil bench handover`: steady telemetry through repeated address changes, MQTT over QUIC vs over TLS.

A vehicle moving between cells (or a NAT rebinding) changes the address the broker sees. The
impairment proxy rebinds `--changes` times within `--duration-s` (new outbound port, alternating
127.0.0.1 / 127.0.0.2; a TCP relay cuts its connections with RST, as a real address change kills a
TCP connection). Meanwhile an Uplink publishes QoS 1 telemetry at `--rate-hz` and a subscriber on
the broker (plain TCP, unimpaired) timestamps arrivals. One line per transport:

    bench handover: transport=quic changes=20 duration_s=60 reconnects=0 longest_gap_s=... lost=0

reconnects: MQTT reconnects of the publishing Uplink (target 0 for QUIC: connection migration);
longest_gap_s: the longest silence between two deliveries at the subscriber; lost: messages never
delivered (QoS 1: 0 expected for both).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from pathlib import Path

from hil.bench.uplink import (
    BenchPki,
    BrokerPorts,
    make_bench_pki,
    quic_factory,
    start_broker_process,
    tls_factory,
)
from hil.impair import ImpairmentProxy, lossy
from uplink.client import Uplink, UplinkConfig


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--changes", type=int, default=20, help="address changes during the run")
    parser.add_argument("--duration-s", type=float, default=60.0, help="length of the run per transport")
    parser.add_argument("--rate-hz", type=float, default=20.0, help="telemetry publishes per second")
    parser.add_argument("--rtt-ms", type=float, default=60.0, help="round-trip time added by the proxy")
    parser.add_argument("--transports", nargs="+", choices=["quic", "tcp"], default=["quic", "tcp"])


async def run_one(kind: str, pki: BenchPki, ports: BrokerPorts, args: argparse.Namespace) -> str:
    upstream = ("127.0.0.1", ports.quic if kind == "quic" else ports.tls)
    async with ImpairmentProxy(upstream, kind="udp" if kind == "quic" else "tcp",
                               profile=lossy(0.0, args.rtt_ms)) as proxy:
        factory = quic_factory(pki, proxy.port) if kind == "quic" else tls_factory(pki, proxy.port)
        sender = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id=f"handover-{kind}",
                                     clean_start=False, session_expiry_s=600, reconnect_initial_s=0.1,
                                     reconnect_max_s=1.0), transport_factory=factory)
        receiver = Uplink(UplinkConfig(host="127.0.0.1", port=ports.tcp, client_id=f"handover-sub-{kind}"))
        arrivals: list[float] = []
        received: set[bytes] = set()
        sent = 0

        async def collect() -> None:
            async for message in receiver.inbound():
                arrivals.append(time.monotonic())
                received.add(message.payload)

        async def publish_steadily(stop_at: float) -> None:
            nonlocal sent
            period_s = 1.0 / args.rate_hz
            async with asyncio.TaskGroup() as pubs:
                while time.monotonic() < stop_at:
                    payload = b"%08d" % sent
                    sent += 1
                    # Not awaited one by one: a publish waiting for its PUBACK across a handover
                    # must not stop the clock of the telemetry behind it.
                    pubs.create_task(sender.publish(f"fleet/{kind}", payload), name=f"pub-{sent}")
                    await asyncio.sleep(period_s)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(receiver.run(), name="receiver")
            tg.create_task(sender.run(), name="sender")
            collector = tg.create_task(collect(), name="collector")
            await receiver.wait_connected()
            await receiver.subscribe([(f"fleet/{kind}", 1)])
            await sender.wait_connected()
            start = time.monotonic()
            publisher = tg.create_task(publish_steadily(start + args.duration_s), name="publisher")
            interval_s = args.duration_s / (args.changes + 1)
            for n in range(args.changes):
                await asyncio.sleep(max(0.0, start + (n + 1) * interval_s - time.monotonic()))
                proxy.rebind("127.0.0.2" if n % 2 == 0 else "127.0.0.1")
            await publisher
            async with asyncio.timeout(30.0):
                while len(received) < sent:  # noqa: ASYNC110 - the broker's deliveries are not our event
                    await asyncio.sleep(0.05)
            collector.cancel()
            await sender.close()
            await receiver.close()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return (f"bench handover: transport={kind} changes={args.changes} duration_s={args.duration_s:g} "
            f"reconnects={sender.reconnects} longest_gap_s={max(gaps, default=0.0):.2f} "
            f"lost={sent - len(received)}")


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-handover-") as tmp:
        directory = Path(tmp)
        pki = make_bench_pki(directory)
        async with start_broker_process(pki, directory) as ports:
            for kind in args.transports:
                try:
                    print(await run_one(kind, pki, ports, args), flush=True)
                except TimeoutError:
                    print(f"bench handover: transport={kind} changes={args.changes} "
                          "result=timeout (messages still missing after 30 s)", flush=True)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="bench-handover")
    add_args(_parser)
    sys.exit(asyncio.run(main(_parser.parse_args())))
