"""`edge-hil bench NAME`: the registry of benchmarks and their argparse wiring.

A benchmark is `(add_args, main)`: `add_args(parser)` adds its flags, `async main(args) -> int` runs it
and prints its `bench NAME: ...` line. Add one by putting it in `BENCHES`.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from hil.bench import card, fleet

AddArgs = Callable[[argparse.ArgumentParser], None]
Main = Callable[[argparse.Namespace], Awaitable[int]]

BENCHES: dict[str, tuple[AddArgs, Main]] = {
    "card": (card.add_args, card.main),
    "fleet": (fleet.add_args, fleet.main),
}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """`edge-hil bench NAME [flags]`; each sub-benchmark sets `main` (and `func`) to its entry point."""
    p = subparsers.add_parser("bench", help="run a benchmark and print its `bench NAME: ...` line")
    sub = p.add_subparsers(dest="bench", required=True)
    for name, (add_args, main) in BENCHES.items():
        sp = sub.add_parser(name, help=(main.__doc__ or "").strip().splitlines()[0] if main.__doc__ else None)
        add_args(sp)
        sp.set_defaults(main=main, func=main)
    return p
