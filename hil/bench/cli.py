"""`edge-hil bench NAME`: the registry of benchmarks and their argparse wiring.

A benchmark is `(help, add_args, main)`: `add_args(parser)` adds its flags, `async main(args) -> int` runs
it and prints its `bench NAME: ...` line. Add one by putting it in `BENCHES`.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from hil.bench import broker, card, file, fleet, handover, store, uplink

AddArgs = Callable[[argparse.ArgumentParser], None]
Main = Callable[[argparse.Namespace], Awaitable[int]]

BENCHES: dict[str, tuple[str, AddArgs, Main]] = {
    "card": ("Modbus requests per A11 card, and RTU card time vs the wire-time minimum",
             card.add_args, card.main),
    "fleet": ("833-well fleet and 100-well stress: agent CPU per 1,000 values, RSS, latency, losses",
              fleet.add_args, fleet.main),
    "store": ("durable queue ingest vs raw SQLite inserts (same durability), drain rate, write amplification",
              store.add_args, store.main),
    "broker": ("our broker vs Mosquitto under the same load: msgs/s and broker CPU us per message",
               broker.add_args, broker.main),
    "uplink": ("drain a backlog through the impairment proxy at 100 ms RTT and 0-10 %% loss: QUIC vs TCP/TLS",
               uplink.add_args, uplink.main),
    "file": ("100 MB over MQTT file transfer on a QUIC data stream vs raw aioquic single-stream throughput",
             file.add_args, file.main),
    "handover": ("20 address changes in 60 s: MQTT reconnects and the longest delivery gap, QUIC vs TCP/TLS",
                 handover.add_args, handover.main),
}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """`edge-hil bench NAME [flags]`; each sub-benchmark sets `main` (and `func`) to its entry point."""
    p = subparsers.add_parser("bench", help="run a benchmark and print its `bench NAME: ...` line")
    sub = p.add_subparsers(dest="bench", required=True)
    for name, (text, add_args, main) in BENCHES.items():
        sp = sub.add_parser(name, help=text, description=text.replace("%%", "%"))
        add_args(sp)
        sp.set_defaults(main=main, func=main)
    return p
