"""The QUIC listener's batched UDP transport: every datagram delivered in order, one flush per batch."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import Any

from cloud_broker.listeners.udp import BatchedDatagramTransport
from tests.integration.quic_support import eventually, make_pki, start_broker
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.packets import MQTT_5, ConnAck, Connect
from uplink.quic import QuicSettings, open_quic


class _Recorder:
    def __init__(self) -> None:
        self.transport: Any = None
        self.events: list[tuple[str, Any]] = []
        self.lost = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.events.append(("datagram", data))

    def error_received(self, exc: OSError) -> None:
        self.events.append(("error", exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    def batch_done(self) -> None:
        self.events.append(("batch_done", None))

    def datagrams(self) -> list[bytes]:
        return [data for kind, data in self.events if kind == "datagram"]


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_queued_datagrams_arrive_in_order_in_batches_each_closed_by_one_batch_done() -> None:
    recorder = _Recorder()
    transport = BatchedDatagramTransport(asyncio.get_running_loop(), _bound_socket(), recorder, max_batch=4)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        address = transport.get_extra_info("sockname")
        sent = [b"datagram %d" % n for n in range(10)]
        for data in sent:  # all queued in the kernel before the loop gets to read any
            peer.sendto(data, address)
        await eventually(lambda: len(recorder.datagrams()) == len(sent), 5.0, "all datagrams")
        assert recorder.datagrams() == sent
        kinds = [kind for kind, _ in recorder.events]
        # At most 4 datagrams between two flushes, and the last datagram is followed by one.
        runs = "".join("d" if kind == "datagram" else "|" for kind in kinds).split("|")
        assert all(len(run) <= 4 for run in runs)
        assert kinds[-1] == "batch_done"
        assert "" not in runs[:-1]  # never a flush without datagrams before it
        assert transport.datagrams == len(sent) and transport.batches == kinds.count("batch_done") >= 3
    finally:
        peer.close()
        transport.close()
    await asyncio.wait_for(recorder.lost.wait(), 5.0)
    assert transport.is_closing()


async def test_sendto_reaches_the_peer_and_nothing_is_sent_or_read_after_close() -> None:
    recorder = _Recorder()
    sock = _bound_socket()
    transport = BatchedDatagramTransport(asyncio.get_running_loop(), sock, recorder)
    peer = _bound_socket()
    peer.settimeout(5.0)
    try:
        transport.sendto(b"hello", peer.getsockname())
        data, source = peer.recvfrom(100)
        assert (data, source) == (b"hello", transport.get_extra_info("sockname"))
        assert transport.get_write_buffer_size() == 0
        transport.close()
        transport.sendto(b"late", peer.getsockname())  # dropped silently once closing
        await asyncio.wait_for(recorder.lost.wait(), 5.0)
        assert sock.fileno() == -1
        peer.settimeout(0.2)
        try:
            late = peer.recvfrom(100)
        except TimeoutError:
            late = None
        assert late is None
    finally:
        peer.close()


async def _connect_and_expect_connack(port: int, ca_file: str, client_id: str) -> None:
    """An MQTT 5 client over QUIC connects to the listener and is accepted (CONNACK 0)."""
    link = await open_quic("127.0.0.1", QuicSettings(port=port, ca_file=ca_file), keep_alive_s=30)
    try:
        await link.control.send(encode(Connect(client_id=client_id, protocol_level=MQTT_5), MQTT_5))
        decoder = Decoder(MQTT_5)
        packets: list[object] = []
        async with asyncio.timeout(5.0):
            while not packets:
                packets = list(decoder.feed(await link.control.recv()))
        assert isinstance(packets[0], ConnAck) and packets[0].reason_code == 0
    finally:
        await link.close()


async def test_the_broker_quic_listener_reads_through_the_batched_transport(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    running = await start_broker(pki, tls=False)
    try:
        await _connect_and_expect_connack(running.quic_port, pki.ca_file, "batch-check")
        transport = running.quic.transport
        assert isinstance(transport, BatchedDatagramTransport)
        assert transport.datagrams >= transport.batches > 0
    finally:
        await running.close()


async def test_garbage_datagrams_are_dropped_and_the_listener_keeps_serving(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    running = await start_broker(pki, tls=False)
    rng = random.Random(7)
    blaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        address = ("127.0.0.1", running.quic_port)
        for n in range(600):
            size = rng.choice([0, 1, 5, 20, 1200, 1500, rng.randrange(0, 1500)])
            data = bytes(rng.getrandbits(8) for _ in range(size))
            if n % 3 == 0 and data:  # looks like a QUIC v1 long header (Initial), then nonsense
                data = b"\xc0\x00\x00\x00\x01" + data
            blaster.sendto(data, address)
        transport = running.quic.transport
        assert transport is not None
        await eventually(lambda: transport.datagrams >= 600, 5.0, "every garbage datagram read")
        await _connect_and_expect_connack(running.quic_port, pki.ca_file, "after-garbage")
        assert running.quic.accepting
    finally:
        blaster.close()
        await running.close()
