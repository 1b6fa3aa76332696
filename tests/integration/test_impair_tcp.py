"""The impairment proxy's TCP relay between a real client and a real TCP echo server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from hil.impair import Direction, ImpairmentProxy, LinkImpairment, ManualClock, Profile, lossy

pytestmark = pytest.mark.integration

STEP_TIMEOUT_S = 10.0


class EchoServer:
    """Echoes every byte back; remembers each connection's peer address."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.server: asyncio.Server | None = None
        self.connected = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        self.peers.append((str(host), int(port)))
        self.connected.set()
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass  # the proxy cut the connection: that is what some tests do
        finally:
            writer.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)


@contextlib.asynccontextmanager
async def echo_rig(profile: Profile, *, seed: int = 1, clock: ManualClock | None = None
                   ) -> AsyncIterator[tuple[ImpairmentProxy, EchoServer]]:
    echo = EchoServer()
    echo.server = await asyncio.start_server(echo._handle, "127.0.0.1", 0)
    try:
        async with ImpairmentProxy(echo.address, kind="tcp", profile=profile, seed=seed,
                                   clock=clock) as proxy:
            yield proxy, echo
    finally:
        echo.server.close()


async def round_trip(address: tuple[str, int], payload: bytes, piece_bytes: int = 7000) -> bytes:
    """Send payload in pieces while reading the echo concurrently; half-close; return all echoed bytes."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        async def send() -> None:
            for i in range(0, len(payload), piece_bytes):
                writer.write(payload[i:i + piece_bytes])
                await writer.drain()
            writer.write_eof()

        async with asyncio.timeout(STEP_TIMEOUT_S), asyncio.TaskGroup() as tg:
            tg.create_task(send(), name="test-sender")
            echoed = await reader.read(-1)
        return echoed
    finally:
        writer.close()


def payload(size_bytes: int, seed: int = 3) -> bytes:
    return random.Random(seed).randbytes(size_bytes)


async def test_bytes_arrive_intact_and_in_order_through_a_clear_proxy() -> None:
    data = payload(300_000)
    async with echo_rig(Profile()) as (proxy, _):
        assert await round_trip(proxy.address, data) == data
        stats = await proxy.wait_stats(lambda s: s.connections_open == 0)
        assert stats.up.forwarded_bytes == stats.down.forwarded_bytes == len(data)


async def test_bytes_arrive_intact_and_in_order_under_delay_jitter_loss_and_a_bandwidth_cap() -> None:
    data = payload(200_000)
    link = LinkImpairment(loss_pct=5.0, delay_s=0.002, jitter_s=0.002, rate_bytes_s=4_000_000.0,
                          tcp_loss_penalty_s=0.005, tcp_chunk_bytes=4096, tcp_buffer_bytes=32 * 1024)
    async with echo_rig(Profile(up=link, down=link)) as (proxy, _):
        echoed = await round_trip(proxy.address, data)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        s = proxy.stats()
        assert s.up.penalized_chunks > 0 and s.down.penalized_chunks > 0  # the loss emulation did act
        assert s.up.dropped() == s.down.dropped() == 0


async def test_tcp_data_is_held_until_its_due_time_on_the_proxy_clock() -> None:
    clock = ManualClock()
    async with echo_rig(Profile(up=LinkImpairment(delay_s=1.0)), clock=clock) as (proxy, _):
        reader, writer = await asyncio.open_connection(*proxy.address)
        try:
            writer.write(b"hello")
            await proxy.wait_stats(lambda s: s.up.received_bytes == 5)
            clock.advance(0.999)
            assert proxy.stats().up.forwarded_bytes == 0
            clock.advance(0.001)
            async with asyncio.timeout(STEP_TIMEOUT_S):
                assert await reader.readexactly(5) == b"hello"
        finally:
            writer.close()


async def test_a_blackhole_stalls_tcp_without_losing_bytes() -> None:
    clock = ManualClock()
    async with echo_rig(Profile(), clock=clock) as (proxy, _):
        reader, writer = await asyncio.open_connection(*proxy.address)
        try:
            writer.write(b"one")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                assert await reader.readexactly(3) == b"one"
            proxy.blackhole(30.0)
            writer.write(b"two")
            await proxy.wait_stats(lambda s: s.up.received_bytes == 6)
            clock.advance(29.0)
            assert proxy.stats().up.forwarded_bytes == 3  # stalled, not dropped
            clock.advance(1.0)
            async with asyncio.timeout(STEP_TIMEOUT_S):
                assert await reader.readexactly(3) == b"two"
        finally:
            writer.close()


async def test_rebind_cuts_the_connection_with_a_reset_and_the_next_one_comes_from_a_new_address() -> None:
    async with echo_rig(Profile()) as (proxy, echo):
        reader, writer = await asyncio.open_connection(*proxy.address)
        try:
            writer.write(b"before")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                assert await reader.readexactly(6) == b"before"
            proxy.rebind(host="127.0.0.2")
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    await reader.read(1)
        finally:
            writer.close()
        stats = proxy.stats()
        assert (stats.rebinds, stats.connections_cut, stats.connections_open) == (1, 1, 0)

        data = payload(10_000)
        assert await round_trip(proxy.address, data) == data
        assert [host for host, _ in echo.peers] == ["127.0.0.1", "127.0.0.2"]


async def test_a_refused_upstream_resets_the_client() -> None:
    dead = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    address = dead.sockets[0].getsockname()[:2]
    dead.close()
    await dead.wait_closed()
    async with ImpairmentProxy(address, kind="tcp") as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        try:
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    await reader.read(1)
        finally:
            writer.close()
        assert proxy.stats().connect_failures == 1


async def test_closing_the_proxy_closes_open_connections() -> None:
    async with echo_rig(Profile()) as (proxy, _):
        reader, writer = await asyncio.open_connection(*proxy.address)
        await proxy.wait_stats(lambda s: s.connections_accepted == 1)
        await proxy.close()
        async with asyncio.timeout(STEP_TIMEOUT_S):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(1) == b""
        writer.close()


async def test_the_lossy_profile_penalizes_chunks_in_proportion_to_loss() -> None:
    # per-segment loss on 1448-byte segments: 5 % loss over ~140 segments penalizes many chunks
    clock = ManualClock()
    profile = lossy(5.0, rtt_ms=0.0)
    async with echo_rig(profile, clock=clock, seed=9) as (proxy, _):
        _reader, writer = await asyncio.open_connection(*proxy.address)
        try:
            writer.write(payload(200_000))
            await proxy.wait_stats(lambda s: s.up.received_bytes == 200_000)
            up = proxy.stats().up
            assert 0 < up.penalized_chunks < up.received_packets
            # every penalized chunk (and all behind it) waits one 200 ms RTO-ish penalty
            assert up.forwarded_bytes < 200_000
            clock.advance(0.2)
            await proxy.wait_stats(lambda s: s.up.forwarded_bytes == 200_000)
        finally:
            writer.close()


async def test_run_time_changes_apply_to_new_tcp_data() -> None:
    clock = ManualClock()
    async with echo_rig(Profile(), clock=clock) as (proxy, _):
        reader, writer = await asyncio.open_connection(*proxy.address)
        try:
            writer.write(b"fast")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                assert await reader.readexactly(4) == b"fast"
            proxy.update(Direction.UP, delay_s=5.0)
            writer.write(b"slow")
            await proxy.wait_stats(lambda s: s.up.received_bytes == 8)
            clock.advance(4.0)
            assert proxy.stats().up.forwarded_bytes == 4
            clock.advance(1.0)
            async with asyncio.timeout(STEP_TIMEOUT_S):
                assert await reader.readexactly(4) == b"slow"
        finally:
            writer.close()


async def test_a_client_reset_is_passed_upstream_and_the_proxy_keeps_serving() -> None:
    async with echo_rig(Profile()) as (proxy, _):
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"x")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            assert await reader.readexactly(1) == b"x"
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST from the client
        await proxy.wait_stats(lambda s: s.connections_open == 0)
        data = payload(5000)
        assert await round_trip(proxy.address, data) == data
