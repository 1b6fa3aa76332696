"""Operator tools on the cloud side: fleet table, config push and commands, as an MQTT client of the broker.

`cloud-broker agents`, `cloud-broker config push AGENT FILE` and `cloud-broker cmd AGENT NAME key=value...`
connect to a broker (this one or any MQTT 5 / 3.1.1 broker) with the operator's credentials - the broker's
ACL lets only the operator role publish to agents' command topics - and speak the contract of
uplink.schema.commands. The client is `ClientSession` (uplink.mqtt, sans-I/O) over asyncio streams: the
broker shares only uplink.mqtt and uplink.schema with the edge, so the edge's Uplink is not used here.

Request/response: the reply topic is `{prefix}/{agent}/reply/{client_id}` - inside the agent's own tree,
which the agent may publish to - given as the MQTT 5 Response Topic with random Correlation Data, or as
`reply_to`/`correlation` in the payload at MQTT 3.1.1. Progress notes (final=false) are shown as they come;
the final response ends the wait. Exit status: 0 when the final code is "ok", 1 otherwise, 2 when no
answer came within the timeout (the command may still run: its answer is kept by command id, so sending the
same command id again returns it without running it twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from uplink.mqtt.packets import MQTT_5, NO_PROPERTIES, Properties, Publish
from uplink.mqtt.session import (
    ClientSession,
    Connected,
    ConnectionRefused,
    ConnectTimedOut,
    Disconnected,
    MessageReceived,
    PingTimedOut,
    PublishAcked,
    SessionConfig,
    Subscribed,
)
from uplink.schema.commands import (
    CONTENT_TYPE_COMMAND,
    AgentStatus,
    Command,
    Response,
    ResultCode,
    decode_response,
    decode_status,
    parse_kv_args,
    sign_command,
)
from uplink.schema.topics import DEFAULT_PREFIX, AgentTopics

EXIT_NO_ANSWER = 2


class OperatorError(ConnectionError):
    """The operator client could not connect, was refused, or lost the connection."""


class OperatorClient:
    """A minimal MQTT client: publish (QoS 0/1), subscribe, receive. Use `connect()` to get one."""

    def __init__(self, session: ClientSession, writer: asyncio.StreamWriter) -> None:
        self.session = session
        self._writer = writer
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.messages: asyncio.Queue[Publish] = asyncio.Queue()
        self._lost: OperatorError | None = None
        self._wake = asyncio.Event()

    @property
    def protocol_level(self) -> int:
        return self.session.config.protocol_level

    def _flush(self) -> None:
        data = self.session.data_to_send()
        if data:
            self._writer.write(data)

    def _dispatch(self) -> None:
        while (ev := self.session.next_event()) is not None:
            if isinstance(ev, Connected):
                if not self._connected.done():
                    self._connected.set_result(None)
            elif isinstance(ev, ConnectionRefused):
                self._fail(
                    OperatorError(
                        f"broker refused the connection: 0x{ev.reason_code:02x} "
                        f"{ev.reason_string or ''}".strip()
                    )
                )
            elif isinstance(ev, ConnectTimedOut | PingTimedOut):
                self._fail(OperatorError("broker did not answer in time"))
            elif isinstance(ev, Disconnected):
                self._fail(
                    OperatorError(f"disconnected: 0x{ev.reason_code:02x} {ev.reason_string or ''}".strip())
                )
            elif isinstance(ev, PublishAcked | Subscribed):
                fut = self._waiters.pop(ev.packet_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev.reason_code if isinstance(ev, PublishAcked) else ev.reason_codes)
            elif isinstance(ev, MessageReceived):
                self.messages.put_nowait(ev.publish)

    def _fail(self, exc: OperatorError) -> None:
        self._lost = exc
        for fut in [self._connected, *self._waiters.values()]:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while self._lost is None:
            data = await reader.read(65536)
            if not data:
                self._fail(OperatorError("broker closed the connection"))
                return
            self.session.receive_data(data, loop.time())
            self._dispatch()
            self._flush()

    async def _timer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._lost is None:
            deadline = self.session.next_deadline()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if deadline is None else max(0.0, deadline - loop.time())):
                    await self._wake.wait()
            if deadline is not None and loop.time() >= deadline:
                self.session.handle_deadline(loop.time())
                self._dispatch()
                self._flush()

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        if self._lost is not None:
            raise self._lost
        packet_id = self.session.subscribe([(topic_filter, qos)], now=asyncio.get_running_loop().time())
        fut: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        self._waiters[packet_id] = fut
        self._flush()
        self._wake.set()
        return (await fut)[0]

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties = NO_PROPERTIES,
    ) -> int:
        if self._lost is not None:
            raise self._lost
        packet_id = self.session.publish(
            topic, payload, qos, retain, properties, now=asyncio.get_running_loop().time()
        )
        self._flush()
        self._wake.set()
        if packet_id is None:
            return 0
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[packet_id] = fut
        return await fut

    async def next_message(self) -> Publish:
        if self._lost is not None and self.messages.empty():
            raise self._lost
        return await self.messages.get()


@contextlib.asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    protocol_level: int = MQTT_5,
    timeout_s: float = 10.0,
) -> AsyncIterator[OperatorClient]:
    """An operator client connected to host:port (clean session), disconnected on exit."""
    config = SessionConfig(
        client_id=client_id,
        protocol_level=protocol_level,
        clean_start=True,
        keep_alive_s=30,
        username=username,
        password=password.encode() if password is not None else None,
        connect_timeout_s=timeout_s,
    )
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:  # TimeoutError included
        raise OperatorError(f"cannot reach the broker at {host}:{port}: {exc}") from None
    session = ClientSession(config)
    client = OperatorClient(session, writer)
    try:
        async with asyncio.TaskGroup() as tg:
            t_read = tg.create_task(client._read_loop(reader), name="operator-read")
            t_timer = tg.create_task(client._timer_loop(), name="operator-timer")
            try:
                session.connect(asyncio.get_running_loop().time())
                client._flush()
                client._wake.set()
                await client._connected
                yield client
            finally:
                if client._lost is None:
                    session.disconnect()
                    client._flush()
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(1):
                            await writer.drain()
                t_read.cancel()
                t_timer.cancel()
    except BaseExceptionGroup as group:
        # The TaskGroup wraps whatever ended it (a refusal, or the caller's own exception at the yield);
        # our two tasks never fail on their own, so there is one error: hand it over as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def new_command(
    name: str, args: dict[str, Any], *, validity_s: float = 300.0, now_ns: int | None = None
) -> Command:
    """A command with a fresh id and nonce, valid for validity_s (ready to sign)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    return Command(
        id=f"op-{secrets.token_hex(8)}",
        name=name,
        args=args,
        issued_at_ns=now_ns,
        expires_at_ns=now_ns + int(validity_s * 1e9),
        nonce=secrets.token_hex(16),
    )


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


async def request(
    client: OperatorClient,
    agent_id: str,
    cmd: Command,
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 60.0,
    on_progress: Callable[[Response], None] | None = None,
    signer: tuple[str, Ed25519PrivateKey] | None = None,
) -> Response | None:
    """Send cmd to the agent; its final response, or None on timeout. Progress notes go to on_progress."""
    topics = AgentTopics(agent_id, prefix)
    reply_topic = f"{topics.reply}/{client.session.config.client_id}"
    await client.subscribe(reply_topic, 1)
    correlation = secrets.token_hex(8)
    props = NO_PROPERTIES
    if client.protocol_level == MQTT_5:
        props = Properties(
            response_topic=reply_topic,
            correlation_data=correlation.encode(),
            content_type=CONTENT_TYPE_COMMAND,
            payload_format_indicator=1,
        )
    else:
        cmd = msgspec.structs.replace(cmd, reply_to=reply_topic, correlation=correlation)
    if signer is not None:
        cmd = msgspec.structs.replace(cmd, key_id=signer[0])
        cmd = sign_command(signer[1], agent_id, cmd)
    await client.publish(topics.command, msgspec.json.encode(cmd), qos=1, properties=props)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await client.next_message()
                if msg.topic != reply_topic:
                    continue
                try:
                    resp = decode_response(msg.payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if resp.id != cmd.id:  # ids are random per command: the id alone matches the answer
                    continue
                if not resp.final:
                    if on_progress is not None:
                        on_progress(resp)
                    continue
                return resp
    except TimeoutError:
        return None


async def fleet(
    client: OperatorClient, *, prefix: str = DEFAULT_PREFIX, quiet_s: float = 0.5, max_wait_s: float = 5.0
) -> dict[str, AgentStatus]:
    """The retained status of every agent: collected until no message came for quiet_s (or max_wait_s)."""
    await client.subscribe(f"{prefix}/+/status", 1)
    out: dict[str, AgentStatus] = {}
    deadline = asyncio.get_running_loop().time() + max_wait_s
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            break
        try:
            async with asyncio.timeout(min(quiet_s, remaining)):
                msg = await client.next_message()
        except TimeoutError:
            break
        if not msg.topic.endswith("/status") or not msg.payload:
            continue
        try:
            status = decode_status(msg.payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        out[status.agent] = status
    return out


def fleet_table(statuses: dict[str, AgentStatus], *, now_ns: int | None = None) -> str:
    """A fixed-width table: one line per agent."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    header = ("AGENT", "STATUS", "VERSION", "CONFIG", "TRANSPORT", "LINK", "QUEUE", "UPTIME", "SEEN")
    rows = [header]
    for agent_id in sorted(statuses):
        s = statuses[agent_id]
        seen_s = max(0.0, (now_ns - s.ts_ns) / 1e9)
        state = s.state if s.reason is None or s.state == "online" else f"{s.state} ({s.reason})"
        rows.append(
            (
                agent_id,
                state,
                s.versions.get("agent", "-"),
                s.config_version or "-",
                s.transport or "-",
                s.link or "-",
                "-" if s.queue_depth is None else str(s.queue_depth),
                "-" if s.uptime_s is None else _duration(s.uptime_s),
                _duration(seen_s) + " ago",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


# -- CLI ----------------------------------------------------------------------------------------


def add_operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `agents`, `config push` and `cmd` on the cloud-broker CLI."""
    p = sub.add_parser("agents", help="fleet table from the agents' retained status messages")
    _add_connection(p)
    p.add_argument("--json", action="store_true", help="one JSON object per agent")
    p.description = ("Collect the agents' retained status messages and print one row per agent "
                     "(state, versions, link, queue); exits 0.")
    p.set_defaults(func=cmd_agents)

    p = sub.add_parser("config", help="push a config to an agent (config push AGENT FILE)")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    push = csub.add_parser("push", help="send FILE as config.apply and wait for the verdict")
    _add_connection(push)
    push.add_argument("agent", help="the agent's name (its MQTT user name and topic tree)")
    push.add_argument("file", help="agent TOML config with a top-level version")
    push.description = ("Send FILE to AGENT as a config.apply command and wait for its verdict, showing "
                        "progress notes. Exit 0: applied (code ok); 1: refused or rolled back; 2: no "
                        "answer within --timeout-s.")
    push.add_argument("--dry-run", action="store_true", help="validate (and read new devices) only")
    push.add_argument("--check-devices", action="store_true", help="read each new/changed device first")
    push.add_argument(
        "--gate-s", type=float, help="health gate (default: the agent's commands.health_gate_s)"
    )
    push.set_defaults(func=cmd_config_push)

    p = sub.add_parser("cmd", help="send a command to an agent: cmd AGENT NAME [key=value ...]")
    _add_connection(p)
    p.description = ("Send command NAME with key=value arguments to AGENT and print its response. Exit 0: "
                     "code ok; 1: another code; 2: no answer within --timeout-s.")
    p.add_argument("agent", help="the agent's name (its MQTT user name and topic tree)")
    p.add_argument("name", help="config.get, point.write, card.capture, logs.fetch, agent.status, ...")
    p.add_argument("args", nargs="*", help="key=value (a value that parses as JSON is JSON)")
    p.set_defaults(func=cmd_cmd)


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT",
                   help="the broker to connect to over MQTT/TCP (default: 127.0.0.1:1883)")
    p.add_argument("--username", help="an operator-role user (cloud-broker device add NAME --role operator)")
    p.add_argument("--password", help="that user's password")
    p.add_argument("--mqtt", choices=["3.1.1", "5"], default="5", help="protocol version")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix of the agents")
    p.add_argument("--client-id", default=None, help="default: operator-<random>")
    p.add_argument("--timeout-s", type=float, default=60.0, help="how long to wait for an answer")
    p.add_argument("--key", help="Ed25519 private key (PEM) to sign control commands")
    p.add_argument("--key-id", default="operator", help="the key's id as provisioned on the agents")


def _connect_args(args: argparse.Namespace) -> tuple[str, int, dict[str, Any]]:
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"cloud-broker: --broker {args.broker!r}: expected HOST:PORT")
    return (
        host.strip("[]"),
        int(port),
        {
            "client_id": args.client_id or f"operator-{secrets.token_hex(4)}",
            "username": args.username,
            "password": args.password,
            "protocol_level": MQTT_5 if args.mqtt == "5" else 4,
        },
    )


def _signer(args: argparse.Namespace) -> tuple[str, Ed25519PrivateKey] | None:
    return None if not args.key else (args.key_id, load_private_key(args.key))


def _run(coro: Any) -> int:
    try:
        return int(asyncio.run(coro))
    except OperatorError as exc:
        print(f"cloud-broker: {exc}", file=sys.stderr)
        return 69


def cmd_agents(args: argparse.Namespace) -> int:
    async def main() -> int:
        host, port, kw = _connect_args(args)
        async with connect(host, port, **kw) as client:
            statuses = await fleet(client, prefix=args.prefix)
        if args.json:
            for s in statuses.values():
                print(json.dumps(msgspec.to_builtins(s)))
        else:
            print(fleet_table(statuses) if statuses else "no agents have reported a status")
        return 0

    return _run(main())


def _print_progress(resp: Response) -> None:
    print(f"  ... {resp.message}", flush=True)


def _print_final(resp: Response | None, timeout_s: float) -> int:
    if resp is None:
        print(
            f"no answer within {timeout_s:g} s (the agent may be offline; re-send to ask again)",
            file=sys.stderr,
        )
        return EXIT_NO_ANSWER
    print(f"{resp.code.value}: {resp.message}")
    if resp.result:
        print(json.dumps(resp.result, indent=2, default=str))
    return 0 if resp.code == ResultCode.OK else 1


def cmd_config_push(args: argparse.Namespace) -> int:
    text = Path(args.file).read_text("utf-8")
    cargs: dict[str, Any] = {"config": text, "dry_run": args.dry_run, "check_devices": args.check_devices}
    if args.gate_s is not None:
        cargs["gate_s"] = args.gate_s
    return _send(args, new_command("config.apply", cargs), f"pushing {args.file} to {args.agent}")


def cmd_cmd(args: argparse.Namespace) -> int:
    try:
        cargs = parse_kv_args(args.args)
    except ValueError as exc:
        raise SystemExit(f"cloud-broker: {exc}") from None
    return _send(args, new_command(args.name, cargs), f"{args.name} -> {args.agent}")


def _send(args: argparse.Namespace, cmd: Command, what: str) -> int:
    async def main() -> int:
        host, port, kw = _connect_args(args)
        print(f"{what} (command {cmd.id})", flush=True)
        async with connect(host, port, **kw) as client:
            resp = await request(
                client,
                args.agent,
                cmd,
                prefix=args.prefix,
                timeout_s=args.timeout_s,
                on_progress=_print_progress,
                signer=_signer(args),
            )
        return _print_final(resp, args.timeout_s)

    return _run(main())


def main(argv: list[str] | None = None) -> int:
    """`python -m cloud_broker.operator agents|config push|cmd ...`: the cloud-broker operator commands."""
    parser = argparse.ArgumentParser(
        prog="cloud-broker-operator", description=(__doc__ or "").splitlines()[0]
    )
    add_operator_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
