"""`edge-hil`: hardware-in-the-loop rigs: simulators, the end-to-end demo, benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-hil",
        description="Hardware-in-the-loop rigs for the field gateway: simulated A11 wellsites and T-Boxes, "
        "the end-to-end demo (wells -> agent -> durable queue -> MQTT -> cloud broker -> subscriber) "
        "and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from hil import demo, impair, opcua_station, tbox, wellsite

    wellsite.add_parser(sub)
    opcua_station.add_parser(sub)
    tbox.add_parser(sub)
    impair.add_parser(sub)
    from hil.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(asyncio.run(args.main(args)) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
