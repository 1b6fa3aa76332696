"""`cloud-broker`: run the MQTT 3.1.1/5.0 cloud broker, check its configuration, manage device credentials."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

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
EX_SOFTWARE = 70  # sysexits.h: the broker's state file cannot be used or written
EX_CANTCREAT = 73  # sysexits.h: the credentials file cannot be written


_SECURED = ("tls", "quic")  # listener kinds that need a certificate and key


def _config_from_args(args: argparse.Namespace) -> BrokerConfig:
    """The config file (if any) with the quick flags layered on top."""
    base = load_config(args.config) if args.config else None
    flagged = [("tcp", text) for text in args.tcp] + [("tls", text) for text in args.tls]
    flagged += [("ws", text) for text in args.ws] + [("quic", text) for text in args.quic]
    if base is None and not flagged:
        raise ConfigError("", "nothing to listen on: give --config FILE or at least one --tcp HOST:PORT")
    tls_flags = [flag for flag, given in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca),
                                          ("--require-client-cert", args.require_client_cert)) if given]
    if tls_flags and not any(kind in _SECURED for kind, _ in flagged):
        raise ConfigError(tls_flags[0], "applies to the --tls and --quic listeners given as flags; give one "
                                        "(a config file's listeners take cert_file/key_file/ca_file)")
    data: dict[str, object] = {}
    if base is not None:
        data = msgspec.to_builtins(base)
    if flagged:
        listeners: list[dict[str, object]] = []
        for kind, text in flagged:
            host, port = parse_endpoint(text, f"--{kind}")
            entry: dict[str, object] = {"kind": kind, "host": host, "port": port}
            if kind in _SECURED:
                if not (args.cert and args.key):
                    raise ConfigError(f"--{kind}", f"a {kind} listener needs a certificate: give --cert PEM "
                                                   "and --key PEM (cert_file and key_file in a config file)")
                entry.update(cert_file=args.cert, key_file=args.key, ca_file=args.ca,
                             require_client_cert=args.require_client_cert)
            listeners.append(entry)
        data["listeners"] = listeners
    if args.data is not None:
        data["data_dir"] = args.data
    if args.allow_anonymous:
        data["allow_anonymous"] = True
    if args.log_level is not None:
        data["log_level"] = args.log_level
    if args.file_transfer:
        if data.get("data_dir") is None:
            raise ConfigError("--file-transfer", "file transfer keeps segments and exported files below "
                                                 "the data directory: give --data DIR (or data_dir)")
        section = data.get("file_transfer")
        data["file_transfer"] = {**(section if isinstance(section, dict) else {}), "enable": True}
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
    from cloud_broker.persistence.sqlite import StoreError
    from cloud_broker.sdnotify import NotifySocket, status_line, watchdog_pings
    from cloud_broker.server import serve

    notify = NotifySocket.from_environ()

    async def main() -> int:
        try:
            server = await serve(cfg)
        except OSError as exc:
            what = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            wanted = ", ".join(f"{lc.kind} {lc.host}:{lc.port}" for lc in cfg.listeners)
            print(f"cloud-broker: cannot listen on {wanted}: {what}", file=sys.stderr)
            return EX_UNAVAILABLE
        except StoreError as exc:
            print(f"cloud-broker: {exc}", file=sys.stderr)
            return EX_SOFTWARE
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        endpoints: list[str] = []
        for addr in server.addresses:
            host = f"[{addr.host}]" if ":" in addr.host else addr.host
            endpoints.append(f"{addr.kind} {host}:{addr.port}")
            print(f"cloud-broker: listening {endpoints[-1]}", flush=True)
        if server.files is not None:
            print(f"cloud-broker: file transfer on, exports in "
                  f"{cfg.file_transfer.exports_dir(cfg.data_dir or '.')}", flush=True)
        failed = server.hub.failed

        def status() -> str:
            return f"{server.hub.connection_count} connection(s); listening {', '.join(endpoints)}"

        if notify is not None:
            notify.send("READY=1", status_line(status()))
        metrics_unavailable: OSError | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                tasks: list[asyncio.Task[object]] = [
                    tg.create_task(stop.wait(), name="broker-stop-signal"),
                    tg.create_task(failed.wait(), name="broker-failure")]
                if notify is not None:
                    pings = watchdog_pings(notify, lambda: not failed.is_set(), status)
                    tasks.append(tg.create_task(pings, name="broker-watchdog"))
                if cfg.metrics.enabled:
                    from cloud_broker.metrics import serve_metrics

                    def bound(port: int) -> None:
                        print(f"cloud-broker: metrics http://{cfg.metrics.host}:{port}/metrics", flush=True)

                    metrics = serve_metrics(cfg.metrics.host, cfg.metrics.port, server.broker.stats,
                                            on_bound=bound)
                    tasks.append(tg.create_task(metrics, name="broker-metrics"))
                await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    task.cancel()
        except* OSError as group:
            metrics_unavailable = group.exceptions[0]  # type: ignore[assignment]
        finally:
            log.info("stopping: disconnecting %d connection(s)", server.hub.connection_count)
            if notify is not None:
                notify.send("STOPPING=1", status_line(
                    f"stopping: disconnecting {server.hub.connection_count} connection(s)"))
            await server.close()
        if metrics_unavailable is not None:
            print(f"cloud-broker: cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port}: "
                  f"{metrics_unavailable.strerror or metrics_unavailable}", file=sys.stderr)
            return EX_UNAVAILABLE
        if failed.is_set():
            print(f"cloud-broker: stopped: {server.hub.failed_what} ({server.hub.failure}); "
                  "check the data directory's disk and permissions, then restart", file=sys.stderr)
            return EX_SOFTWARE
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
    auth = "anonymous allowed" if cfg.allow_anonymous else "anonymous refused"
    store = "sqlite" if cfg.durable() else "memory"
    files = "on" if cfg.file_transfer.enable else "off"
    print(f"cloud-broker: config OK: listeners {listeners}; {auth}; data dir {cfg.data_dir or '(none)'}; "
          f"state in {store}; file transfer {files}")
    return 0


def _credentials_path(args: argparse.Namespace) -> Path:
    if args.config:
        cfg = load_config(args.config)
        if args.data is not None:
            cfg = parse_config({**msgspec.to_builtins(cfg), "data_dir": args.data})
    else:
        if args.data is None:
            raise ConfigError("--data", "give --data DIR (or --config FILE with data_dir)")
        cfg = parse_config({"data_dir": args.data})
    path = cfg.credentials_path()
    if path is None:
        raise ConfigError("data_dir", "the credentials file is relative but no data_dir is set")
    return path


def cmd_device(args: argparse.Namespace) -> int:
    from cloud_broker.auth import (
        CredentialsError,
        generate_password,
        load_credentials,
        make_credential,
        save_credentials,
    )

    try:
        path = _credentials_path(args)
        creds = load_credentials(path)
        if args.action == "list":
            for cred in sorted(creds.values(), key=lambda c: c.name):
                print(f"{cred.name}\t{cred.role}")
            return 0
        if not args.name:
            raise ConfigError("NAME", f"device {args.action} needs a device name")
        if args.action == "remove":
            if args.name not in creds:
                print(f"cloud-broker: no device named {args.name!r} in {path}", file=sys.stderr)
                return 1
            del creds[args.name]
            save_credentials(path, creds)
            print(f"cloud-broker: removed {args.name}")
            return 0
        if args.password_file:
            password = Path(args.password_file).read_bytes().rstrip(b"\r\n")
            if not password:
                raise ConfigError("--password-file", "the file is empty")
            generated = None
        else:
            generated = generate_password()
            password = generated.encode()
        replaced = args.name in creds
        creds[args.name] = make_credential(args.name, password, args.role)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_credentials(path, creds)
        print(f"cloud-broker: {'replaced' if replaced else 'added'} {args.role} {args.name}")
        if generated is not None:
            print(f"password: {generated}")
        return 0
    except (ConfigError, CredentialsError) as exc:
        print(f"cloud-broker: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        print(f"cloud-broker: {exc}", file=sys.stderr)
        return EX_CANTCREAT


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help="TOML config file (listeners, data_dir, allow_anonymous, [limits], [features], "
                        "[file_transfer], ...); the flags below override it")
    p.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT",
                   help="serve MQTT over TCP on HOST:PORT (repeatable; port 0 picks a free port; "
                        "the listener flags together replace the config file's listeners)")
    p.add_argument("--tls", action="append", default=[], metavar="HOST:PORT",
                   help="serve MQTT over TLS on HOST:PORT with --cert/--key (repeatable)")
    p.add_argument("--ws", action="append", default=[], metavar="HOST:PORT",
                   help="serve MQTT over WebSocket on HOST:PORT, path /mqtt (repeatable)")
    p.add_argument("--quic", action="append", default=[], metavar="HOST:PORT",
                   help="serve MQTT over QUIC (UDP, ALPN mqtt, EMQX-compatible) on HOST:PORT with "
                        "--cert/--key (repeatable; the usual port is 14567)")
    p.add_argument("--cert", metavar="PEM",
                   help="server certificate chain for the --tls and --quic listeners")
    p.add_argument("--key", metavar="PEM", help="private key of --cert (unencrypted PEM)")
    p.add_argument("--ca", metavar="PEM",
                   help="CA certificates that sign client certificates: --tls/--quic clients are asked "
                        "for one and a verified certificate's CN is the client's identity")
    p.add_argument("--require-client-cert", action="store_true",
                   help="with --ca: refuse --tls/--quic clients without a valid client certificate (mTLS)")
    p.add_argument("--data", metavar="DIR",
                   help="directory for durable broker state: SQLite sessions/queues/retained, the "
                        "devices.json credentials file and file-transfer storage (created if missing)")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="accept clients without credentials (default: only devices from the credentials "
                        "file and verified client certificates)")
    p.add_argument("--file-transfer", action="store_true",
                   help="enable EMQX-compatible MQTT file transfer ($file/...) with the [file_transfer] "
                        "defaults; needs --data (segments and exports are kept below it)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: the config's log_level, else info)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud-broker",
        description="The fieldgate cloud broker: MQTT 3.1.1 and 5.0 over TCP, TLS, WebSocket and QUIC "
                    "with retained messages, persistent sessions, wills, shared subscriptions, QoS 0/1/2 "
                    "and file transfer; and the operator's tools (agents, config push, cmd) as a client.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the broker until SIGTERM/SIGINT",
                         description="Run the broker. Prints 'cloud-broker: listening KIND HOST:PORT' per "
                                     "bound socket once ready. Under systemd (Type=notify) it then sends "
                                     "READY=1, WATCHDOG=1 every half WatchdogSec= while healthy, and "
                                     "STOPPING=1. On SIGTERM/SIGINT MQTT 5 clients get DISCONNECT 0x8B "
                                     "(server shutting down) and the process exits 0. Exit 78: invalid "
                                     "configuration; 69: a listener cannot be bound; 70: state cannot be "
                                     "written.")
    _add_common(run)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate the configuration and exit",
                           description="Validate the configuration (file and flags) without binding.")
    _add_common(check)
    check.set_defaults(func=cmd_check)
    device = sub.add_parser(
        "device", help="add, remove or list device credentials",
        description="Manage the credentials file (DIR/devices.json: salted scrypt hashes). A running broker "
                    "picks changes up at the next login. `add` without --password-file generates a "
                    "password and prints it once.")
    device.add_argument("action", choices=["add", "remove", "list"])
    device.add_argument("name", nargs="?", metavar="NAME", help="device name (its MQTT user name)")
    device.add_argument("--data", metavar="DIR", help="the broker's data directory")
    device.add_argument("--config", "-c", metavar="FILE", help="take data_dir and [auth] from this config")
    device.add_argument("--password-file", metavar="F", help="read the password from F (first line)")
    device.add_argument("--role", choices=["device", "operator"], default="device",
                        help="device: its own fg/v1/NAME/ tree; operator: may command every device")
    device.set_defaults(func=cmd_device)
    from cloud_broker.operator import add_operator_commands

    add_operator_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
