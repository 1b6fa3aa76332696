"""The impairment proxy's UDP relay between a real client socket and a real UDP echo server on loopback.

Time is the proxy's own `ManualClock` where delays matter: nothing is due until the test advances it, so
"not delivered before its due time" is checked without any wall-clock measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from hil.impair import Direction, DropReason, ImpairmentProxy, LinkImpairment, ManualClock, Profile, handover

pytestmark = pytest.mark.integration

STEP_TIMEOUT_S = 10.0


class Endpoint(asyncio.DatagramProtocol):
    """A UDP socket that records what it receives (and, as a server, echoes it back)."""

    def __init__(self, echo: bool, clock: Callable[[], float] | None = None) -> None:
        self.echo = echo
        self.clock = clock
        self.received: list[tuple[bytes, tuple[str, int], float | None]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        source = (str(addr[0]), int(addr[1]))
        self.received.append((data, source, self.clock() if self.clock else None))
        self.arrived.set()
        if self.echo:
            assert self.transport is not None
            self.transport.sendto(data, source)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    @property
    def local(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def wait_count(self, n: int) -> None:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while len(self.received) < n:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def echo_rig(profile: Profile, *, seed: int = 1, clock: ManualClock | None = None
                   ) -> AsyncIterator[tuple[ImpairmentProxy, Endpoint, Endpoint]]:
    """An echo server, a proxy in front of it, and a client socket connected to the proxy."""
    loop = asyncio.get_running_loop()
    server_t, server = await loop.create_datagram_endpoint(
        lambda: Endpoint(echo=True, clock=clock.now_s if clock else None), local_addr=("127.0.0.1", 0))
    try:
        async with ImpairmentProxy(server.local, kind="udp", profile=profile, seed=seed,
                                   clock=clock) as proxy:
            client_t, client = await loop.create_datagram_endpoint(
                lambda: Endpoint(echo=False), remote_addr=proxy.address)
            try:
                yield proxy, server, client
            finally:
                client_t.close()
    finally:
        server_t.close()


async def proxy_received(proxy: ImpairmentProxy, n: int) -> None:
    """Sync point: the proxy has read n datagrams from the client (not a timing check)."""
    await proxy.wait_stats(lambda s: s.up.received_packets == n, timeout_s=STEP_TIMEOUT_S)


def one_way(**link: object) -> Profile:
    """Impair only client -> server, so the echo path back is clean."""
    return Profile(up=LinkImpairment(**link))  # type: ignore[arg-type]


async def test_a_clear_proxy_relays_datagrams_both_ways() -> None:
    async with echo_rig(Profile()) as (proxy, server, client):
        for i in range(5):
            client.send(b"ping %d" % i)
        await client.wait_count(5)
        assert sorted(d for d, _, _ in client.received) == [b"ping %d" % i for i in range(5)]
        s = proxy.stats()
        assert (s.up.forwarded_packets, s.down.forwarded_packets, s.flows) == (5, 5, 1)
        # the server sees the proxy's outbound socket, not the client
        assert {src for _, src, _ in server.received} == set(proxy.outbound_addresses())
        assert client.local not in proxy.outbound_addresses()


async def test_seeded_loss_drops_close_to_the_configured_share_of_datagrams() -> None:
    n = 2000
    async with echo_rig(one_way(loss_pct=10.0), seed=42) as (proxy, server, client):
        for i in range(n):
            client.send(i.to_bytes(4, "big"))
            if i % 20 == 19:  # pace on our counters, so no socket buffer overflows and loses for us
                await proxy_received(proxy, i + 1)
                await server.wait_count(proxy.stats().up.forwarded_packets)
        up = proxy.stats().up
        await server.wait_count(up.forwarded_packets)
        lost = n - len(server.received)
        assert up.dropped(DropReason.LOSS) == lost
        assert abs(lost - 200) < 5 * 14  # binomial(2000, 0.1): sd ~ 13.4


async def test_the_same_seed_loses_the_same_datagrams_on_the_wire() -> None:
    async def survivors(seed: int) -> list[bytes]:
        async with echo_rig(one_way(loss_pct=20.0), seed=seed) as (proxy, server, client):
            for i in range(200):
                client.send(i.to_bytes(2, "big"))
                await proxy_received(proxy, i + 1)
            await server.wait_count(proxy.stats().up.forwarded_packets)
            return sorted(d for d, _, _ in server.received)

    first = await survivors(5)
    assert first == await survivors(5)
    assert first != await survivors(6)


async def test_delayed_datagrams_are_not_delivered_before_their_due_time() -> None:
    clock = ManualClock(start_s=1000.0)
    delay_s, jitter_s, n = 0.1, 0.02, 20
    async with echo_rig(one_way(delay_s=delay_s, jitter_s=jitter_s), clock=clock) as (proxy, server, client):
        sent_at = {}
        for i in range(n):
            sent_at[i] = clock.now_s()
            client.send(bytes([i]))
            await proxy_received(proxy, i + 1)
            clock.advance(0.001)
        # nothing is due yet: the proxy holds every datagram
        assert proxy.stats().up.forwarded_packets == 0
        # step the clock in 5 ms slices; after each step, wait until the server got what the proxy sent
        while proxy.stats().up.forwarded_packets < n:
            clock.advance(0.005)
            await server.wait_count(proxy.stats().up.forwarded_packets)
        for data, _, received_at in server.received:
            assert received_at is not None
            assert received_at >= sent_at[data[0]] + delay_s - jitter_s
            assert received_at <= sent_at[data[0]] + delay_s + jitter_s + 0.005


async def test_a_blackhole_drops_everything_during_the_window_and_nothing_after() -> None:
    clock = ManualClock()
    async with echo_rig(Profile(), clock=clock) as (proxy, server, client):
        proxy.blackhole(5.0)
        for i in range(10):
            client.send(b"dark %d" % i)
        await proxy_received(proxy, 10)
        assert proxy.stats().dark
        clock.advance(5.0)
        client.send(b"light")
        await client.wait_count(1)
        # loopback keeps order, so datagrams leaked during the window would have arrived before "light"
        assert [d for d, _, _ in server.received] == [b"light"]
        s = proxy.stats()
        assert s.up.dropped(DropReason.BLACKHOLE) == 10
        assert not s.dark


async def test_datagrams_in_flight_when_a_blackhole_starts_are_lost() -> None:
    clock = ManualClock()
    async with echo_rig(one_way(delay_s=1.0), clock=clock) as (proxy, server, client):
        client.send(b"in flight")
        await proxy_received(proxy, 1)
        proxy.blackhole(None)
        clock.advance(2.0)
        proxy.end_blackhole()
        client.send(b"after")
        await proxy_received(proxy, 2)
        clock.advance(1.0)
        await server.wait_count(1)
        assert [d for d, _, _ in server.received] == [b"after"]
        assert proxy.stats().up.dropped(DropReason.BLACKHOLE) == 1


async def test_a_scheduled_tunnel_goes_dark_and_comes_back() -> None:
    clock = ManualClock()
    profile = Profile(blackhole_after_s=1.0, blackhole_s=2.0)
    async with echo_rig(profile, clock=clock) as (proxy, server, client):
        for k, (t, expect_through) in enumerate(((0.5, True), (1.5, False), (2.9, False), (3.1, True))):
            clock.advance_to(t)
            client.send(b"at %.1f" % t)
            await proxy_received(proxy, k + 1)
            if expect_through:
                await server.wait_count(proxy.stats().up.forwarded_packets)
        assert [d for d, _, _ in server.received] == [b"at 0.5", b"at 3.1"]


async def test_rebind_moves_the_server_side_address_while_the_client_keeps_its_socket() -> None:
    async with echo_rig(Profile()) as (proxy, server, client):
        client.send(b"before")
        await client.wait_count(1)
        old_source = server.received[-1][1]
        proxy.rebind()
        client.send(b"after")
        await client.wait_count(2)  # the echo reached the unchanged client socket through the new mapping
        new_source = server.received[-1][1]
        assert new_source != old_source
        assert new_source[0] == old_source[0]
        assert proxy.outbound_addresses() == [new_source]
        assert proxy.stats().rebinds == 1


async def test_rebind_can_change_the_loopback_address_as_a_handover_would() -> None:
    async with echo_rig(Profile()) as (proxy, server, client):
        client.send(b"on 127.0.0.1")
        await client.wait_count(1)
        proxy.rebind(host="127.0.0.2")
        client.send(b"on 127.0.0.2")
        await client.wait_count(2)
        assert [src[0] for _, src, _ in server.received] == ["127.0.0.1", "127.0.0.2"]


async def test_the_handover_profile_rebinds_on_schedule_alternating_hosts() -> None:
    clock = ManualClock()
    async with echo_rig(handover(every_s=10.0), clock=clock) as (proxy, server, client):
        sources = []
        for k in range(4):
            client.send(b"%d" % k)
            await client.wait_count(k + 1)
            sources.append(server.received[-1][1])
            clock.advance(10.0)
        assert proxy.stats().rebinds == 4
        assert [h for h, _ in sources] == ["127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.2"]
        assert len(set(sources)) == 4


async def test_replies_to_the_old_mapping_after_a_rebind_are_not_relayed() -> None:
    async with echo_rig(Profile()) as (proxy, server, client):
        client.send(b"hello")
        await client.wait_count(1)
        old_source = server.received[-1][1]
        proxy.rebind()
        # the server answers the address it knew; that NAT mapping is gone
        assert server.transport is not None
        server.transport.sendto(b"stale", old_source)
        client.send(b"fresh")
        await client.wait_count(2)
        # had the proxy kept the old mapping, "stale" (sent first) would be among these two
        assert [d for d, _, _ in client.received] == [b"hello", b"fresh"]


async def test_a_bandwidth_cap_queues_datagrams_behind_each_other() -> None:
    clock = ManualClock()
    profile = one_way(rate_bytes_s=10_000.0, burst_bytes=1000)
    async with echo_rig(profile, clock=clock) as (proxy, server, client):
        for i in range(5):
            client.send(bytes([i]) * 1000)
        await proxy_received(proxy, 5)
        await server.wait_count(1)  # the burst lets the first one through at once
        for k in range(1, 5):  # each further 1000 B waits 0.1 s at 10 kB/s
            clock.advance(0.1)
            await server.wait_count(k + 1)
        assert [d[0] for d, _, _ in server.received] == [0, 1, 2, 3, 4]
        assert [t for _, _, t in server.received] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


async def test_profile_changes_apply_at_run_time() -> None:
    async with echo_rig(Profile()) as (proxy, server, client):
        proxy.update(Direction.UP, loss_pct=100.0)
        client.send(b"lost")
        await proxy_received(proxy, 1)
        proxy.set_profile(Profile())
        client.send(b"kept")
        await server.wait_count(1)
        assert [d for d, _, _ in server.received] == [b"kept"]
        assert proxy.stats().up.dropped(DropReason.LOSS) == 1


async def test_an_upstream_given_by_name_is_matched_by_its_address() -> None:
    loop = asyncio.get_running_loop()
    server_t, server = await loop.create_datagram_endpoint(lambda: Endpoint(echo=True),
                                                           local_addr=("127.0.0.1", 0))
    try:
        async with ImpairmentProxy(("localhost", server.local[1]), kind="udp") as proxy:
            client_t, client = await loop.create_datagram_endpoint(lambda: Endpoint(echo=False),
                                                                   remote_addr=proxy.address)
            try:
                client.send(b"by name")
                await client.wait_count(1)
            finally:
                client_t.close()
    finally:
        server_t.close()
