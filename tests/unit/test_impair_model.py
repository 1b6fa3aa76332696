"""The impairment proxy's pure parts: link shaper, blackhole windows, manual clock, profiles, CLI flags."""

from __future__ import annotations

import argparse
import math

import pytest

from hil.impair import (
    LINUX_MIN_RTO_S,
    BlackholeWindows,
    Direction,
    DropReason,
    LinkImpairment,
    LinkShaper,
    ManualClock,
    Profile,
    add_parser,
    cellular,
    handover,
    lossy,
    profile_from_args,
    tunnel,
)


def shaper(**link: object) -> LinkShaper:
    return LinkShaper(LinkImpairment(**link), seed=7, direction=Direction.UP)  # type: ignore[arg-type]


def drops(s: LinkShaper, n: int) -> list[int]:
    return [i for i in range(n) if s.admit_datagram(100, float(i)).drop is DropReason.LOSS]


# ---- loss


def test_datagram_loss_rate_is_close_to_the_configured_percentage() -> None:
    lost = len(drops(shaper(loss_pct=10.0), 20_000))
    # binomial sd = sqrt(20000 * 0.1 * 0.9) ~ 42; 5 sd keeps a correct shaper passing for any seed
    assert abs(lost - 2000) < 5 * 42


def test_the_same_seed_loses_the_same_datagrams_and_another_seed_loses_others() -> None:
    a = drops(shaper(loss_pct=5.0), 2000)
    b = drops(shaper(loss_pct=5.0), 2000)
    c = drops(LinkShaper(LinkImpairment(loss_pct=5.0), seed=8, direction=Direction.UP), 2000)
    assert a == b
    assert a != c


def test_the_loss_pattern_does_not_depend_on_jitter() -> None:
    assert drops(shaper(loss_pct=5.0), 2000) == drops(shaper(loss_pct=5.0, jitter_s=0.05, delay_s=0.1), 2000)


def test_directions_draw_independent_losses() -> None:
    up = drops(LinkShaper(LinkImpairment(loss_pct=5.0), seed=7, direction=Direction.UP), 2000)
    down = drops(LinkShaper(LinkImpairment(loss_pct=5.0), seed=7, direction=Direction.DOWN), 2000)
    assert up != down


def test_zero_and_full_loss_are_exact() -> None:
    assert drops(shaper(loss_pct=0.0), 1000) == []
    assert len(drops(shaper(loss_pct=100.0), 1000)) == 1000


# ---- delay and jitter


def test_delay_without_jitter_is_exact() -> None:
    s = shaper(delay_s=0.25)
    assert s.admit_datagram(500, 10.0).due_s == pytest.approx(10.25)


def test_jittered_delays_stay_within_the_band_and_vary() -> None:
    s = shaper(delay_s=0.1, jitter_s=0.03)
    delays = [s.admit_datagram(100, 1.0).due_s - 1.0 for _ in range(500)]  # type: ignore[operator]
    assert all(0.07 - 1e-9 <= d <= 0.13 + 1e-9 for d in delays)
    assert max(delays) - min(delays) > 0.03


def test_jitter_larger_than_the_delay_never_delivers_before_arrival() -> None:
    s = shaper(delay_s=0.01, jitter_s=0.05)
    assert all(s.admit_datagram(100, 5.0).due_s >= 5.0 for _ in range(500))  # type: ignore[operator]


def test_jitter_reorders_datagrams_unless_reordering_is_off() -> None:
    def dues(reorder: bool) -> list[float]:
        s = shaper(delay_s=0.1, jitter_s=0.05, reorder=reorder)
        out: list[float] = []
        last = -math.inf
        for i in range(200):  # 1 ms spacing, far below the jitter
            due = s.admit_datagram(100, i * 0.001, not_before_s=last).due_s
            assert due is not None
            out.append(due)
            last = max(last, due)
        return out

    reordering = dues(True)
    assert reordering != sorted(reordering)
    ordered = dues(False)
    assert ordered == sorted(ordered)


# ---- bandwidth cap


def test_the_rate_cap_spaces_back_to_back_packets_by_their_serialization_time() -> None:
    s = shaper(rate_bytes_s=1000.0, burst_bytes=500)
    dues = [s.admit_datagram(500, 0.0).due_s for _ in range(4)]
    # the first packet uses the full bucket; each further one waits 500 B / 1000 B/s
    assert dues == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_an_idle_bucket_refills_up_to_the_burst_only() -> None:
    s = shaper(rate_bytes_s=1000.0, burst_bytes=1000)
    assert s.admit_datagram(1000, 0.0).due_s == pytest.approx(0.0)
    # 100 s idle refills only to the 1000-byte burst: the second 1000 B packet waits 1 s
    assert s.admit_datagram(1000, 100.0).due_s == pytest.approx(100.0)
    assert s.admit_datagram(1000, 100.0).due_s == pytest.approx(101.0)


def test_a_packet_larger_than_the_burst_still_gets_through_at_the_rate() -> None:
    s = shaper(rate_bytes_s=1000.0, burst_bytes=100)
    assert s.admit_datagram(1100, 0.0).due_s == pytest.approx(1.0)


def test_the_rate_cap_adds_propagation_delay_after_queueing() -> None:
    s = shaper(rate_bytes_s=1000.0, burst_bytes=500, delay_s=0.2)
    assert [s.admit_datagram(500, 0.0).due_s for _ in range(2)] == pytest.approx([0.2, 0.7])


def test_a_full_queue_tail_drops_datagrams() -> None:
    s = shaper(rate_bytes_s=1000.0, burst_bytes=1000, queue_limit_bytes=3000)
    verdicts = [s.admit_datagram(1000, 0.0) for _ in range(6)]
    assert [v.drop for v in verdicts] == [None, None, None, None, DropReason.QUEUE, DropReason.QUEUE]
    assert s.backlog_bytes(0.0) == pytest.approx(3000.0)
    assert s.backlog_bytes(3.0) == 0.0


# ---- TCP chunks


def test_tcp_chunks_are_never_dropped_and_lost_segments_cost_one_penalty() -> None:
    s = shaper(loss_pct=20.0, delay_s=0.05, tcp_loss_penalty_s=0.3)
    verdicts = [s.admit_chunk(1448, float(i)) for i in range(2000)]
    assert all(v.drop is None and v.due_s is not None for v in verdicts)
    penalized = [v for v in verdicts if v.penalty_s]
    assert abs(len(penalized) - 400) < 5 * 18  # one segment per chunk: binomial(2000, 0.2)
    assert all(v.due_s == pytest.approx(i + 0.35) for i, v in enumerate(verdicts) if v.penalty_s)


def test_bigger_tcp_chunks_are_penalized_more_often_since_they_carry_more_segments() -> None:
    small = sum(bool(shaper(loss_pct=2.0).admit_chunk(1448, 0.0).penalty_s) for _ in range(1))
    s1, s10 = shaper(loss_pct=2.0), shaper(loss_pct=2.0)
    one = sum(bool(s1.admit_chunk(1448, float(i)).penalty_s) for i in range(3000))
    ten = sum(bool(s10.admit_chunk(14480, float(i)).penalty_s) for i in range(3000))
    assert small in (0, 1)
    # P(any of 10 lost) = 1 - 0.98^10 ~ 18 % against 2 %
    assert ten > 5 * one


def test_the_default_tcp_loss_penalty_is_rto_like() -> None:
    assert LinkImpairment().loss_penalty_s == LINUX_MIN_RTO_S
    assert LinkImpairment(delay_s=0.5, jitter_s=0.1).loss_penalty_s == pytest.approx(1.4)


def test_tcp_chunks_keep_their_order_behind_a_penalized_chunk() -> None:
    s = shaper(loss_pct=30.0, delay_s=0.1, jitter_s=0.09, tcp_loss_penalty_s=1.0)
    last = -math.inf
    dues = []
    for i in range(500):
        v = s.admit_chunk(1000, i * 0.01, not_before_s=last)
        assert v.due_s is not None
        dues.append(v.due_s)
        last = v.due_s
    assert dues == sorted(dues)


# ---- blackholes


def test_an_on_demand_blackhole_lasts_its_duration() -> None:
    w = BlackholeWindows()
    assert not w.is_dark(0.0)
    w.start(10.0, 5.0)
    assert w.dark_until(12.0) == 15.0
    assert not w.is_dark(15.0)


def test_an_open_ended_blackhole_lasts_until_ended() -> None:
    w = BlackholeWindows()
    w.start(1.0, None)
    assert w.dark_until(1e6) == math.inf
    w.end(2e6)
    assert not w.is_dark(2e6)


def test_scheduled_blackholes_repeat_from_the_moment_the_profile_is_applied() -> None:
    w = BlackholeWindows()
    w.schedule(tunnel(blackhole_s=3.0, after_s=2.0, every_s=10.0), applied_at_s=100.0)
    dark = [t for t in range(100, 130) if w.is_dark(float(t))]
    assert dark == [102, 103, 104, 112, 113, 114, 122, 123, 124]
    assert w.dark_until(113.5) == 115.0


def test_a_one_shot_tunnel_ends_for_good() -> None:
    w = BlackholeWindows()
    w.schedule(tunnel(blackhole_s=30.0, after_s=0.0), applied_at_s=0.0)
    assert w.is_dark(0.0)
    assert w.is_dark(29.9)
    assert not any(w.is_dark(float(t)) for t in range(30, 1000, 7))


def test_a_profile_without_blackholes_clears_the_schedule() -> None:
    w = BlackholeWindows()
    w.schedule(tunnel(blackhole_s=3.0, after_s=0.0), applied_at_s=0.0)
    w.schedule(Profile(), applied_at_s=1.0)
    assert not w.is_dark(1.0)


# ---- manual clock


def test_the_manual_clock_fires_timers_in_time_order_at_their_time() -> None:
    clock = ManualClock(start_s=5.0)
    fired: list[tuple[str, float]] = []
    clock.call_at(7.0, lambda: fired.append(("b", clock.now_s())))
    clock.call_at(6.0, lambda: fired.append(("a", clock.now_s())))
    cancelled = clock.call_at(6.5, lambda: fired.append(("x", clock.now_s())))
    cancelled.cancel()
    clock.advance(1.5)
    assert fired == [("a", 6.0)]
    assert clock.now_s() == 6.5
    clock.advance_to(10.0)
    assert fired == [("a", 6.0), ("b", 7.0)]


def test_a_timer_scheduled_from_a_timer_fires_within_the_same_advance() -> None:
    clock = ManualClock()
    fired: list[float] = []

    def tick() -> None:
        fired.append(clock.now_s())
        if len(fired) < 3:
            clock.call_at(clock.now_s() + 1.0, tick)

    clock.call_at(1.0, tick)
    clock.advance(10.0)
    assert fired == [1.0, 2.0, 3.0]


# ---- profiles and configuration


def test_lossy_splits_the_rtt_between_directions() -> None:
    p = lossy(5.0, rtt_ms=200.0)
    assert p.up.delay_s == p.down.delay_s == pytest.approx(0.1)
    assert p.up.loss_pct == p.down.loss_pct == 5.0


def test_handover_and_cellular_profiles_schedule_rebinds() -> None:
    h = handover(3.0, gap_s=0.2)
    assert (h.rebind_every_s, h.rebind_hosts, h.handover_gap_s) == (3.0, ("127.0.0.1", "127.0.0.2"), 0.2)
    c = cellular(up_kbps=800, down_kbps=8000)
    assert (c.up.rate_bytes_s, c.down.rate_bytes_s) == (100_000.0, 1_000_000.0)
    assert c.rebind_every_s is None


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"loss_pct": 101.0}, "loss_pct"),
    ({"delay_s": -1.0}, "delay_s"),
    ({"rate_bytes_s": 0.0}, "rate_bytes_s"),
    ({"burst_bytes": 0}, "burst_bytes"),
])
def test_an_invalid_link_names_the_offending_field(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LinkImpairment(**kwargs)  # type: ignore[arg-type]


def test_a_blackhole_period_shorter_than_its_window_is_rejected() -> None:
    with pytest.raises(ValueError, match="blackhole_every_s"):
        tunnel(blackhole_s=10.0, every_s=5.0)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["impair", *argv])


def test_cli_flags_become_a_symmetric_profile() -> None:
    args = parse("--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:7001", "--udp", "--loss-pct", "5",
                 "--delay-ms", "50", "--jitter-ms", "10", "--rate-kbps", "800", "--rebind-every-s", "4",
                 "--seed", "3")
    assert (args.listen, args.upstream, args.kind, args.seed) == (("127.0.0.1", 7000), ("127.0.0.1", 7001),
                                                                  "udp", 3)
    p = profile_from_args(args)
    assert p.up == p.down
    assert (p.up.loss_pct, p.up.delay_s, p.up.jitter_s, p.up.rate_bytes_s) == (5.0, 0.05, 0.01, 100_000.0)
    assert p.rebind_every_s == 4.0
    assert p.blackhole_after_s is None


def test_cli_blackhole_flags_schedule_windows() -> None:
    p = profile_from_args(parse("--upstream", "127.0.0.1:1", "--tcp", "--blackhole-s", "2",
                                "--blackhole-every-s", "10"))
    assert (p.blackhole_after_s, p.blackhole_s, p.blackhole_every_s) == (10.0, 2.0, 10.0)


def test_cli_requires_a_transport_and_a_host_port_upstream() -> None:
    with pytest.raises(SystemExit):
        parse("--upstream", "127.0.0.1:1")
    with pytest.raises(SystemExit):
        parse("--upstream", "nowhere", "--udp")
