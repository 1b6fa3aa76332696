"""`cloud-broker run` as a process, wired end to end: QUIC from flags (--cert/--key, mTLS with --ca),
QUIC options from the config, file transfer (--file-transfer) with our uploader and with paho, and
sd_notify (READY/STATUS/WATCHDOG/STOPPING) through a real NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.files import FilesSection
from agent.files.sendfile import send_file
from cloud_broker.files.storage import export_hash
from hil.net import free_port
from tests.integration.quic_support import Pki, make_pki
from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.codec import encode
from uplink.mqtt.packets import MQTT_5, Connect
from uplink.quic import QuicLink, QuicOverloaded, QuicSettings, QuicStreamError, open_quic

pytestmark = pytest.mark.system

CLI = str(Path(sys.executable).parent / "cloud-broker")
STEP_S = 15.0


@dataclass
class BrokerProcess:
    proc: asyncio.subprocess.Process
    lines: list[str]  # what it printed on stdout while starting


@contextlib.asynccontextmanager
async def broker_process(*args: str, ready_lines: int = 1,
                         env: dict[str, str] | None = None) -> AsyncIterator[BrokerProcess]:
    """`cloud-broker run ARGS` until its first `ready_lines` stdout lines are out; SIGTERM at the end."""
    proc = await asyncio.create_subprocess_exec(
        CLI, "run", "--log-level", "warning", *args, stdout=subprocess.PIPE, stderr=None,
        env={**os.environ, **(env or {})})
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(STEP_S):
            while len(lines) < ready_lines:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise AssertionError(f"broker exited ({await proc.wait()}) after {lines}")
                lines.append(line.strip())
        yield BrokerProcess(proc, lines)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10.0):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def quic_factory(settings: QuicSettings, links: list[QuicLink] | None = None):  # type: ignore[no-untyped-def]
    async def factory(config: UplinkConfig):  # type: ignore[no-untyped-def]
        link = await open_quic(config.host, settings, keep_alive_s=config.keep_alive_s,
                               connect_timeout_s=config.connect_timeout_s)
        if links is not None:
            links.append(link)
        return link.control
    return factory


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


# -- QUIC ---------------------------------------------------------------------------------------


async def test_run_with_quic_cert_and_key_flags_serves_our_quic_uplink_both_ways(pki: Pki) -> None:
    quic_port, tcp_port = free_port("udp"), free_port("tcp")
    async with broker_process("--quic", f"127.0.0.1:{quic_port}", "--tcp", f"127.0.0.1:{tcp_port}",
                              "--cert", pki.cert_file, "--key", pki.key_file, "--allow-anonymous",
                              ready_lines=2) as broker:
        assert set(broker.lines) == {f"cloud-broker: listening quic 127.0.0.1:{quic_port}",
                                     f"cloud-broker: listening tcp 127.0.0.1:{tcp_port}"}
        settings = QuicSettings(port=quic_port, ca_file=pki.ca_file, handshake_timeout_s=5.0)
        links: list[QuicLink] = []
        device = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id="well-7"),
                        transport_factory=quic_factory(settings, links))
        app = Uplink(UplinkConfig(host="127.0.0.1", port=tcp_port, client_id="app"))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(device.run(), name="device")
            tg.create_task(app.run(), name="app")
            async with asyncio.timeout(STEP_S):
                await app.wait_connected()
                await device.wait_connected()
                assert await app.subscribe([("data/#", 1)]) == (1,)
                assert await device.subscribe([("cmd/well-7/#", 1)]) == (1,)
                assert await device.publish("data/well-7", b"42") == 0
                up = await anext(app.inbound())
                assert await app.publish("cmd/well-7/setpoint", b"7") == 0
                down = await anext(device.inbound())
            await device.close()
            await app.close()
    assert (up.topic, up.payload) == ("data/well-7", b"42")
    assert (down.topic, down.payload) == ("cmd/well-7/setpoint", b"7")
    assert links and links[0].alpn == "mqtt"


async def test_run_with_ca_and_require_client_cert_lets_only_quic_clients_with_a_certificate_in(
        pki: Pki, tmp_path: Path) -> None:
    port, data_dir = free_port("udp"), tmp_path / "broker"
    # The certificate's CN is the device's identity; it must be a registered device (no password needed).
    added = await asyncio.create_subprocess_exec(CLI, "device", "add", "well-0001", "--data", str(data_dir),
                                                 stdout=subprocess.DEVNULL)
    assert await added.wait() == 0
    async with broker_process("--quic", f"127.0.0.1:{port}", "--cert", pki.cert_file, "--key", pki.key_file,
                              "--ca", pki.ca_file, "--require-client-cert", "--data", str(data_dir)):
        anonymous = await open_quic("127.0.0.1", QuicSettings(port=port, ca_file=pki.ca_file,
                                                              handshake_timeout_s=5.0))
        with pytest.raises(QuicStreamError):  # the handshake completes, then the broker closes
            async with asyncio.timeout(STEP_S):
                await anonymous.control.send(encode(Connect("anon", protocol_level=MQTT_5), MQTT_5))
                await anonymous.control.recv()
        await anonymous.close()
        settings = QuicSettings(port=port, ca_file=pki.ca_file, cert_file=pki.client_cert_file,
                                key_file=pki.client_key_file, handshake_timeout_s=5.0)
        device = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id="well-0001"),
                        transport_factory=quic_factory(settings))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(device.run(), name="device")
            async with asyncio.timeout(STEP_S):
                await device.wait_connected()
                assert await device.publish("fg/v1/well-0001/data", b"1") < 0x80
            await device.close()


async def test_the_quic_options_of_a_config_listener_reach_the_listener(pki: Pki, tmp_path: Path) -> None:
    port = free_port("udp")
    config = tmp_path / "broker.toml"
    config.write_text(f'allow_anonymous = true\n[[listeners]]\nkind = "quic"\nhost = "127.0.0.1"\n'
                      f'port = {port}\ncert_file = "{pki.cert_file}"\nkey_file = "{pki.key_file}"\n'
                      'quic = { max_connections = 1 }\n')
    async with broker_process("--config", str(config)):
        settings = QuicSettings(port=port, ca_file=pki.ca_file, handshake_timeout_s=5.0)
        first = await open_quic("127.0.0.1", settings)
        await first.control.send(encode(Connect("first", protocol_level=MQTT_5), MQTT_5))
        async with asyncio.timeout(STEP_S):
            assert await first.control.recv()  # CONNACK: the one allowed connection is in
        with pytest.raises(QuicOverloaded):
            await open_quic("127.0.0.1", settings)
        await first.close()


# -- file transfer ------------------------------------------------------------------------------


def export_path(data_dir: Path, client_id: str, file_id: str, name: str) -> Path:
    h = export_hash(client_id, file_id)
    return data_dir / "file_transfer" / "exports" / h[:2] / h[2:4] / h[4:] / client_id / file_id / name


async def test_run_with_file_transfer_accepts_a_file_from_our_uploader(tmp_path: Path) -> None:
    port, data_dir = free_port("tcp"), tmp_path / "broker"
    data = os.urandom(2 * 65536 + 77)
    path = tmp_path / "card.bin"
    path.write_bytes(data)
    async with broker_process("--tcp", f"127.0.0.1:{port}", "--data", str(data_dir), "--file-transfer",
                              "--allow-anonymous", ready_lines=2) as broker:
        assert broker.lines[1].startswith("cloud-broker: file transfer on")
        async with asyncio.timeout(STEP_S):
            outcome = await send_file(UplinkConfig("127.0.0.1", port, "well-3"),
                                      FilesSection(mode="sync", segment_size_bytes=65536),
                                      tmp_path / "outbox.db", path)
    assert outcome.ok, outcome.error
    assert outcome.file_id is not None
    exported = export_path(data_dir, "well-3", outcome.file_id, "card.bin")
    assert exported.read_bytes() == data
    sidecar = json.loads(exported.with_name("card.bin.MANIFEST.json").read_text())
    assert sidecar["checksum"] == hashlib.sha256(data).hexdigest()


class PahoPeer:
    """paho-mqtt (MQTT 5) in its own thread: QoS 1 publishes that wait for their PUBACK codes."""

    def __init__(self, port: int, client_id: str) -> None:
        self.acks: dict[int, int] = {}
        self.cond = threading.Condition()
        self.responses: list[dict[str, Any]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_publish = self._acked
        self.client.on_message = self._message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(f"$file-response/{client_id}", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(STEP_S), "no SUBACK for the response topic"

    def _acked(self, _c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        with self.cond:
            self.acks[mid] = int(reason_code.value)
            self.cond.notify_all()

    def _message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.responses.append(json.loads(msg.payload))
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes = b"") -> int:
        info = self.client.publish(topic, payload, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.acks, STEP_S), f"no PUBACK for {topic}"
            return self.acks.pop(info.mid)

    def response(self, topic: str) -> dict[str, Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: any(r["topic"] == topic for r in self.responses), STEP_S)
            return next(r for r in self.responses if r["topic"] == topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_run_with_file_transfer_serves_paho_with_responses_on_its_response_topic(
        tmp_path: Path) -> None:
    port, data_dir = free_port("tcp"), tmp_path / "broker"
    data, fid = os.urandom(3000), str(uuid.uuid4())
    async with broker_process("--tcp", f"127.0.0.1:{port}", "--data", str(data_dir), "--file-transfer",
                              "--allow-anonymous", ready_lines=2):

        def transfer() -> dict[str, Any]:
            peer = PahoPeer(port, "paho-ft")
            try:
                assert peer.publish(f"$file/{fid}/init", json.dumps({"name": "p.bin"}).encode()) == 0
                for offset in range(0, 3000, 1000):
                    chunk = data[offset:offset + 1000]
                    digest = hashlib.sha256(chunk).hexdigest()
                    assert peer.publish(f"$file/{fid}/{offset}/{digest}", chunk) == 0
                fin = f"$file/{fid}/fin/3000/{hashlib.sha256(data).hexdigest()}"
                assert peer.publish(fin) == 0
                return peer.response(fin)
            finally:
                peer.close()

        body = await asyncio.to_thread(transfer)
    assert (body["reason_code"], body["reason_description"]) == (0, "success")
    assert export_path(data_dir, "paho-ft", fid, "p.bin").read_bytes() == data


# -- sd_notify ----------------------------------------------------------------------------------

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET (an abstract name), recording the sender's pid."""

    def __init__(self) -> None:
        self.name = f"@fieldgate-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.messages: list[tuple[int, dict[str, str]]] = []

    async def until(self, key: str, value: str | None = None) -> dict[str, str]:
        """The next message carrying key (=value), recording every message on the way."""
        while True:
            data, ancdata, _flags, _addr = await self._recvmsg()
            pid = next((_UCRED.unpack(d[:_UCRED.size])[0] for level, kind, d in ancdata
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((pid, fields))
            if key in fields and (value is None or fields[key] == value):
                return fields

    async def _recvmsg(self) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(self.sock, _wake, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(self.sock)

    def close(self) -> None:
        self.sock.close()


async def test_run_under_systemd_notifies_ready_status_watchdog_pings_and_stopping() -> None:
    port = free_port("tcp")
    listener = NotifyListener()
    try:
        env = {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "200000"}  # pings every 0.1 s
        async with broker_process("--tcp", f"127.0.0.1:{port}", "--allow-anonymous", env=env) as broker:
            async with asyncio.timeout(STEP_S):
                ready = await listener.until("READY", "1")
                assert f"listening tcp 127.0.0.1:{port}" in ready["STATUS"]
                for _ in range(3):
                    ping = await listener.until("WATCHDOG", "1")
                    assert "0 connection(s)" in ping["STATUS"]
                broker.proc.send_signal(signal.SIGTERM)
                await listener.until("STOPPING", "1")
                assert await broker.proc.wait() == 0
    finally:
        listener.close()
    assert {pid for pid, _ in listener.messages} == {broker.proc.pid}  # NotifyAccess=main holds
    keys = [next(iter(fields)) for _, fields in listener.messages]
    assert keys[0] == "READY" and keys[-1] == "STOPPING"


async def test_a_watchdog_meant_for_another_process_gets_no_pings_but_ready_and_stopping_still_go() -> None:
    port = free_port("tcp")
    listener = NotifyListener()
    try:
        env = {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
        async with broker_process("--tcp", f"127.0.0.1:{port}", "--allow-anonymous", env=env) as broker:
            async with asyncio.timeout(STEP_S):
                await listener.until("READY", "1")
                # Long enough for several pings at the advertised 0.05 s pace, had they been sent.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await listener.until("WATCHDOG")
                broker.proc.send_signal(signal.SIGTERM)
                await listener.until("STOPPING", "1")
    finally:
        listener.close()
    assert not any("WATCHDOG" in fields for _, fields in listener.messages)
