"""`edge-agent`: run the agent, check a config, poll devices once, inspect the durable buffer."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from agent.config import EX_CONFIG, AgentConfig, ConfigError, load_config

log = logging.getLogger("edge-agent")


def _load_or_exit(path: str) -> AgentConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"edge-agent: invalid config {path}: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load_or_exit(args.config)
    points = sum(len(d.points) for d in cfg.modbus)
    cards = sum(1 for d in cfg.modbus if d.card is not None)
    print(
        f"edge-agent: config OK: agent {cfg.agent.id}, {len(cfg.modbus)} modbus device(s), "
        f"{points} point(s), {cards} card source(s), uplink {cfg.uplink.host}:{cfg.uplink.port}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    base = _load_or_exit(args.config)
    from agent.app import Agent
    from agent.ops import RingLog, resolve_startup_config
    from agent.sdnotify import Notifier

    # Read before anything else: children (none today) must not notify in our name (NotifyAccess=main).
    notifier = Notifier.from_env(unset_environment=True)
    try:
        base_text: str | None = Path(args.config).read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        base_text = None
    # A config pushed over MQTT and committed (under the data dir) wins over the base file.
    cfg, text, source = resolve_startup_config(base, base_text)
    _setup_logging(args.log_level or cfg.agent.log_level)
    ring = RingLog()
    logging.getLogger().addHandler(ring)
    agent = Agent(cfg, config_text=text, config_source=source, notifier=notifier, ring_log=ring)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(main())
    log.info("stopped cleanly" + (f" (exit {agent.exit_code})" if agent.exit_code else ""))
    return agent.exit_code


def cmd_poll(args: argparse.Namespace) -> int:
    cfg = _load_or_exit(args.config)
    from drivers.modbus.driver import poll_once

    items = asyncio.run(poll_once(cfg.modbus))
    bad = 0
    for item in items:
        data = msgspec.to_builtins(item)
        if isinstance(data, dict):
            data.pop("raw_registers", None)
            data = {"kind": type(item).__name__, **data}
        if getattr(item, "quality", "GOOD") != "GOOD":
            bad += 1
        if args.json:
            print(json.dumps(data, default=str))
        else:
            print(data)
    if bad:
        print(f"edge-agent: {bad} of {len(items)} reading(s) not GOOD", file=sys.stderr)
    return 1 if bad and args.strict else 0


def cmd_buffer(args: argparse.Namespace) -> int:
    from store_forward import inspect as store_inspect

    if args.action == "stats":
        print(json.dumps(store_inspect.stats(args.db), indent=2, default=str))
    elif args.action == "peek":
        for row in store_inspect.peek(args.db, limit=args.limit):
            print(json.dumps(row, default=str))
    elif args.action == "export":
        n = store_inspect.export(args.db, args.output)
        print(f"edge-agent: exported {n} record(s) to {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Field edge agent: polls Modbus devices (incl. A11 dynamometer cards), buffers every "
        "record durably in SQLite and forwards it to the cloud broker over MQTT, at least once.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    p.add_argument("--config", required=True, help="agent TOML config file")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides agent.log_level"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check", help=f"validate a config file; exit {EX_CONFIG} and name the bad field if invalid"
    )
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "poll",
        help="read every configured device once and print what the agent would record "
        "(commissioning aid; uploads nothing)",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--once", action="store_true", default=True, help="one acquisition cycle (the default)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--strict", action="store_true", help="exit 1 when any reading is not GOOD")
    p.set_defaults(func=cmd_poll)

    p = sub.add_parser("buffer", help="inspect the durable queue of a (stopped or running) agent")
    p.add_argument("action", choices=["stats", "peek", "export"])
    p.add_argument("--db", required=True, help="queue database, e.g. /var/lib/edge-agent/queue.db")
    p.add_argument("--limit", type=int, default=10, help="peek: how many records")
    p.add_argument("--output", default="-", help="export: JSON-lines file (default stdout)")
    p.set_defaults(func=cmd_buffer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
