"""A blocking MQTT test client over a raw socket and our codec, for broker tests that must control every
packet (when to ack, what to send malformed); and a helper that runs the `cloud-broker` process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hil.net import free_port, wait_tcp_listening
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.packets import (
    MQTT_5,
    NO_PROPERTIES,
    ConnAck,
    Connect,
    Packet,
    Properties,
    PubAck,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
)

CLI = str(Path(sys.executable).parent / "cloud-broker")


class RawClient:
    def __init__(self, port: int, level: int = MQTT_5, timeout_s: float = 5.0) -> None:
        self.level = level
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.decoder = Decoder(level)
        self.inbox: list[Packet] = []
        self.closed = False

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p, self.level) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.inbox.extend(self.decoder.feed(data))
        return True

    def next(self, timeout_s: float = 5.0) -> Packet:
        deadline = time.monotonic() + timeout_s
        while not self.inbox:
            if not self._fill(deadline) and (self.closed or time.monotonic() >= deadline):
                raise TimeoutError("no packet from the broker" + (" (closed)" if self.closed else ""))
        return self.inbox.pop(0)

    def drain(self, quiet_s: float = 0.3) -> list[Packet]:
        """Everything that arrives until the broker is quiet for quiet_s."""
        while self._fill(time.monotonic() + quiet_s):
            pass
        out, self.inbox = self.inbox, []
        return out

    def wait_closed(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.closed and time.monotonic() < deadline:
            self._fill(deadline)
        return self.closed

    def connect(self, client_id: str, *, clean: bool = True, expiry_s: int | None = None,
                username: str | None = None, password: bytes | None = None,
                keep_alive_s: int = 60) -> ConnAck:
        props = Properties(session_expiry_interval=expiry_s) if expiry_s is not None else NO_PROPERTIES
        self.send(Connect(client_id, protocol_level=self.level, clean_start=clean, keep_alive_s=keep_alive_s,
                          username=username, password=password,
                          properties=props if self.level == MQTT_5 else NO_PROPERTIES))
        ack = self.next()
        assert isinstance(ack, ConnAck), ack
        return ack

    def subscribe(self, *filters: str, qos: int = 1, pid: int = 1) -> SubAck:
        self.send(Subscribe(pid, tuple(Subscription(f, qos) for f in filters)))
        ack = self.next()
        assert isinstance(ack, SubAck), ack
        return ack

    def publish_acked(self, topic: str, payload: bytes, qos: int, pid: int, timeout_s: float = 5.0) -> Packet:
        """Publish QoS 1/2 and wait for its PUBACK / PUBREC (completing QoS 2 with PUBREL)."""
        self.send(Publish(topic, payload, qos=qos, packet_id=pid))
        others: list[Packet] = []
        try:
            while True:
                packet = self.next(timeout_s)
                if isinstance(packet, PubAck | PubRec) and packet.packet_id == pid:
                    if isinstance(packet, PubRec):
                        self.send(PubRel(pid))
                    return packet
                others.append(packet)
        finally:
            self.inbox[:0] = others  # what arrived meanwhile stays for the caller

    def close(self) -> None:
        self.sock.close()


@contextmanager
def broker_process(*args: str, port: int | None = None) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """`cloud-broker run --tcp 127.0.0.1:PORT ARGS...`, checked to be ours, terminated afterwards."""
    port = port or free_port()
    proc = start_broker(port, args)
    try:
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def start_broker(port: int, args: Sequence[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([CLI, "run", "--tcp", f"127.0.0.1:{port}", "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_tcp_listening(port, pid=proc.pid)
    except TimeoutError:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(f"broker did not start: {err}") from None
    return proc
