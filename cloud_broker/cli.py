"""`cloud-broker`: run the MQTT 3.1.1/5.0 cloud broker, or check its configuration."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import sys
from collections.abc import Sequence

import msgspec

from cloud_broker.config import (
    EX_CONFIG,
    BrokerConfig,
    ConfigError,
    load_config,
    parse_config,
    parse_endpoint,
)

log = logging.getLogger("cloud_broker")

EX_UNAVAILABLE = 69  # sysexits.h: a listener could not be bound (port in use, address not available)


def _config_from_args(args: argparse.Namespace) -> BrokerConfig:
    """The config file (if any) with the quick flags layered on top."""
    if args.quic:
        raise ConfigError("--quic", "the QUIC listener is not available yet (it arrives in a later "
                                    "release); use --tcp HOST:PORT")
    base = load_config(args.config) if args.config else None
    if base is None and not args.tcp:
        raise ConfigError("", "nothing to listen on: give --config FILE or at least one --tcp HOST:PORT")
    data: dict[str, object] = {}
    if base is not None:
        data = msgspec.to_builtins(base)
    if args.tcp:
        endpoints = [parse_endpoint(text, "--tcp") for text in args.tcp]
        data["listeners"] = [{"kind": "tcp", "host": host, "port": port} for host, port in endpoints]
    if args.data is not None:
        data["data_dir"] = args.data
    if args.allow_anonymous:
        data["allow_anonymous"] = True
    if args.log_level is not None:
        data["log_level"] = args.log_level
    return parse_config(data)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = _config_from_args(args)
    except ConfigError as exc:
        print(f"cloud-broker: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    _setup_logging(cfg.log_level)
    from cloud_broker.server import serve

    async def main() -> int:
        try:
            server = await serve(cfg)
        except OSError as exc:
            what = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            endpoints = ", ".join(f"{lc.kind} {lc.host}:{lc.port}" for lc in cfg.listeners)
            print(f"cloud-broker: cannot listen on {endpoints}: {what}", file=sys.stderr)
            return EX_UNAVAILABLE
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for addr in server.addresses:
            host = f"[{addr.host}]" if ":" in addr.host else addr.host
            print(f"cloud-broker: listening {addr.kind} {host}:{addr.port}", flush=True)
        try:
            await stop.wait()
        finally:
            log.info("stopping: disconnecting %d connection(s)", server.hub.connection_count)
            await server.close()
        return 0

    rc = asyncio.run(main())
    if rc == 0:
        log.info("stopped cleanly")
    return rc


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = _config_from_args(args)
    except ConfigError as exc:
        print(f"cloud-broker: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    listeners = ", ".join(f"{lc.kind} {lc.host}:{lc.port}" for lc in cfg.listeners)
    auth = "anonymous allowed" if cfg.allow_anonymous else "anonymous refused (no credentials provider yet)"
    print(f"cloud-broker: config OK: listeners {listeners}; {auth}; data dir {cfg.data_dir or '(none)'}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help="TOML config file (listeners, data_dir, allow_anonymous, [limits], [features]); "
                        "the flags below override it")
    p.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT",
                   help="serve MQTT over TCP on HOST:PORT (repeatable; port 0 picks a free port; "
                        "replaces the config file's listeners)")
    p.add_argument("--quic", action="append", default=[], metavar="HOST:PORT",
                   help="serve MQTT over QUIC (not available yet: refused with a clear error)")
    p.add_argument("--data", metavar="DIR", help="directory for durable broker state (created if missing)")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="accept clients without credentials (default: refuse them, since no credentials "
                        "provider exists yet every client would be refused)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: the config's log_level, else info)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud-broker",
        description="The fieldgate cloud broker: MQTT 3.1.1 and 5.0 with retained messages, persistent "
                    "sessions, wills, shared subscriptions and QoS 0/1/2.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the broker until SIGTERM/SIGINT",
                         description="Run the broker. Prints 'cloud-broker: listening KIND HOST:PORT' per "
                                     "bound socket once ready. On SIGTERM/SIGINT MQTT 5 clients get "
                                     "DISCONNECT 0x8B (server shutting down) and the process exits 0.")
    _add_common(run)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate the configuration and exit",
                           description="Validate the configuration (file and flags) without binding.")
    _add_common(check)
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
