"""`edge-agent`: run the agent, check a config, poll devices once, inspect the buffer, send a file."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
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
    # Files the config names must exist on this box: a DBC that does not load would leave its port dark.
    from drivers.serial.config import SlcanProtocol
    from drivers.serial.dbc import CanDatabase, DbcError

    for i, port in enumerate(cfg.serial):
        if isinstance(port.protocol, SlcanProtocol):
            try:
                CanDatabase.from_file(port.protocol.dbc)
            except DbcError as exc:
                where = f"serial[{i}].protocol.dbc"
                print(f"edge-agent: invalid config {args.config}: {where}: {exc}", file=sys.stderr)
                return EX_CONFIG
    points = sum(len(d.points) for d in cfg.modbus)
    cards = sum(1 for d in cfg.modbus if d.card is not None)
    opcua_points = sum(len(s.points) for s in cfg.opcua)
    q = cfg.queue
    bounds = [
        f"{name}={value}"
        for name, value in (
            ("max_bytes", q.max_bytes),
            ("max_records", q.max_records),
            ("max_age_s", q.max_age_s),
            ("min_free_disk_bytes", q.min_free_disk_bytes),
        )
        if value is not None
    ]
    print(
        f"edge-agent: config OK: agent {cfg.agent.id}, {len(cfg.modbus)} modbus device(s), "
        f"{points} point(s), {cards} card source(s), {len(cfg.opcua)} OPC UA server(s) "
        f"({opcua_points} point(s)), {len(cfg.serial)} serial port(s), "
        f"{len(cfg.files.folders)} watched folder(s), queue bounds {', '.join(bounds) or 'none'}, "
        f"uplink {cfg.uplink.host}:{cfg.uplink.port}"
    )
    print(f"edge-agent: transport {describe_transport(cfg)}")
    if cfg.uplink.transport == "auto" and not cfg.uplink.tls:
        print("edge-agent: note: the TCP fallback is not encrypted (uplink.tls = false)", file=sys.stderr)
    return 0


def describe_transport(cfg: AgentConfig) -> str:
    """`quic 10.0.0.1:14567, fallback tls 10.0.0.1:8883` and the like (what `check` prints)."""
    u = cfg.uplink
    tcp = f"{'tls' if u.tls else 'tcp'} {u.host}:{u.port}"
    quic = f"quic {u.host}:{u.quic.port}"
    if u.transport == "tcp":
        return tcp
    if u.transport == "quic":
        return f"{quic} (no fallback)"
    f = u.failover
    return f"{quic}, fallback {tcp} (QUIC re-probed after {f.probe_initial_s:g}..{f.probe_max_s:g} s)"


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

    loop_name, loop_factory = event_loop(args.loop)
    log.info("event loop: %s", loop_name)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    log.info("stopped cleanly" + (f" (exit {agent.exit_code})" if agent.exit_code else ""))
    return agent.exit_code


LOOPS = ("auto", "uvloop", "asyncio")


def event_loop(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(name, loop factory) for `edge-agent run --loop`; a None factory is asyncio's own loop.

    "auto" (the default) takes uvloop when it is installed: measured with `edge-hil bench fleet`, it
    costs ~5 % less agent CPU per value on the 833-well fleet and ~14 % less on the card stress case
    (means of 5-6 runs each: fleet 2.14 vs 2.24 ms, stress 1.43 vs 1.66 ms per 1,000 values).
    "asyncio" turns it off; "uvloop" insists on it (exit EX_CONFIG when it is not installed).
    """
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            print("edge-agent: --loop uvloop, but uvloop is not installed", file=sys.stderr)
            raise SystemExit(EX_CONFIG) from None
        return "asyncio", None
    if choice not in ("auto", "uvloop"):
        raise ValueError(f"unknown event loop {choice!r}; expected one of {LOOPS}")
    return "uvloop", uvloop.new_event_loop


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
    from store_forward.model import StoreError

    try:
        if args.action == "stats":
            out = store_inspect.stats(args.db, audit=args.audit, live_window_s=args.live_window_s)
            print(json.dumps(out, indent=2, default=str))
            if args.audit and not _audit_ok(out):
                print("edge-agent: audit found a problem (see audit above)", file=sys.stderr)
                return 1
        elif args.action == "peek":
            for row in store_inspect.peek(args.db, limit=args.limit or 10):
                print(json.dumps(row, default=str))
        elif args.action == "export":
            n = store_inspect.export(args.db, args.output)
            print(f"edge-agent: exported {n} record(s) to {args.output}", file=sys.stderr)
        elif args.action == "gaps":
            gaps = store_inspect.gaps(args.db, limit=args.limit or 1000)
            for gap in gaps:
                print(json.dumps(gap, default=str))
            print(f"edge-agent: {len(gaps)} gap(s) not yet announced upstream", file=sys.stderr)
    except StoreError as exc:
        print(f"edge-agent: {args.db}: {exc}", file=sys.stderr)
        return 1
    return 0


def _audit_ok(out: dict[str, object]) -> bool:
    audit = out.get("audit")
    if not isinstance(audit, dict):
        return True
    return audit.get("quick_check") == ["ok"] and bool(audit.get("counters_match_rows"))


def cmd_send_file(args: argparse.Namespace) -> int:
    """Upload one file over the agent's broker, beside a running agent (its own client id)."""
    cfg = _load_or_exit(args.config)
    _setup_logging(args.log_level or "warning")
    import dataclasses

    from agent.files import ProgressBar, send_file
    from agent.link import failover_config, uplink_config
    from uplink.failover import FailoverTransportFactory

    path = Path(args.path)
    if not path.is_file():
        print(f"edge-agent: {path}: no such file", file=sys.stderr)
        return 1
    # Not the agent's client id: the broker allows one connection per id and would drop the agent.
    link = dataclasses.replace(uplink_config(cfg), client_id=f"{cfg.client_id}-send-file")
    factory = None
    if cfg.uplink.transport != "tcp":
        # The same transport as the agent; no 0-RTT ticket of its own (the agent's file is the agent's).
        failover = failover_config(cfg)
        failover = dataclasses.replace(failover, quic=dataclasses.replace(failover.quic, ticket_file=None))
        factory = FailoverTransportFactory(failover)
    data_dir = Path(cfg.agent.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    bar = None if args.quiet else ProgressBar(path.name)

    async def main() -> int:
        async with asyncio.timeout(args.timeout_s):
            outcome = await send_file(link, cfg.files, data_dir / "files.db", path, progress=bar,
                                      transport_factory=factory)
        if outcome.ok:
            print(f"edge-agent: {path} uploaded as {outcome.file_id}")
            return 0
        print(f"edge-agent: upload of {path} failed: {outcome.error}", file=sys.stderr)
        return 1

    try:
        return asyncio.run(main())
    except TimeoutError:
        print(f"edge-agent: {path} not uploaded within {args.timeout_s:g} s; run again to resume",
              file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Field edge agent: polls Modbus TCP/RTU (incl. A11 dynamometer cards), OPC UA and serial "
        "devices (NMEA, SLCAN/CAN), buffers every record durably in SQLite and forwards it to the cloud "
        "broker over MQTT (QUIC or TCP/TLS), at least once; uploads watched files; obeys pushed commands.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    p.add_argument("--config", required=True, help="agent TOML config file")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides agent.log_level"
    )
    p.add_argument(
        "--loop", choices=LOOPS, default="auto",
        help="event loop: uvloop when installed (auto, the default), or insist on asyncio/uvloop",
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
    p.add_argument(
        "action",
        choices=["stats", "peek", "export", "gaps"],
        help="stats: totals; peek: next records in drain order; export: every record as JSON lines; "
        "gaps: evicted/lost ranges not yet announced upstream",
    )
    p.add_argument("--db", required=True, help="queue database, e.g. /var/lib/edge-agent/queue.db")
    p.add_argument("--limit", type=int, help="peek: how many records (10); gaps: how many gaps (1000)")
    p.add_argument("--output", default="-", help="export: JSON-lines file (default stdout)")
    p.add_argument(
        "--audit",
        action="store_true",
        help="stats: also run quick_check, recount the counters and split live/backlog (O(records)); "
        "exit 1 if the check or the recount disagrees",
    )
    p.add_argument("--live-window-s", type=float, default=60.0, help="stats --audit: the live window")
    p.set_defaults(func=cmd_buffer)

    p = sub.add_parser(
        "send-file",
        help="upload one file now over MQTT file transfer (beside a running agent; resumes an "
        "interrupted upload of the same file); exit 1 if it was not uploaded",
    )
    p.add_argument("path")
    p.add_argument("--config", required=True, help="the agent's TOML config (broker, [files] tuning)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="give up after this long (default 1 h)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_send_file)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
