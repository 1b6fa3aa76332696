"""OpcUaDriver against the HIL gathering station (a real asyncua server on a loopback port)."""

from __future__ import annotations

import asyncio
import datetime as dt
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from drivers.base import Quality
from drivers.opcua.config import OpcUaPoint, OpcUaServer
from hil.net import free_port
from hil.opcua_station import OpcUaStation
from tests.integration.opcua_support import WAIT_S, running

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

USERS = {"operator": "s3cret"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def station() -> AsyncIterator[OpcUaStation]:
    """Plain station, frozen simulation: each test drives its own well's values."""
    async with OpcUaStation("127.0.0.1", free_port(), wells=12, update_interval_s=None) as st:
        yield st


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure_station() -> AsyncIterator[OpcUaStation]:
    async with OpcUaStation(
        "127.0.0.1",
        free_port(),
        wells=1,
        update_interval_s=None,
        security=("Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"),
        users=USERS,
    ) as st:
        yield st


def fast(st: OpcUaStation, *points: OpcUaPoint, **kw: object) -> OpcUaServer:
    """A server config with short intervals so tests see changes quickly."""
    base: dict[str, object] = {
        "name": "station",
        "endpoint": st.endpoint,
        "points": points,
        "publishing_interval_s": 0.05,
        "poll_interval_s": 0.05,
        "keepalive_s": 0.5,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
        "timeout_s": 2.0,
    }
    base.update(kw)
    return OpcUaServer(**base)  # type: ignore[arg-type]


async def test_a_subscription_delivers_each_change_with_its_source_timestamp(station: OpcUaStation) -> None:
    await station.set_value(1, "TubingPressure", 2.0)
    point = OpcUaPoint(name="tubing", node_id=station.node_id(1, "TubingPressure"))
    async with running(fast(station, point)) as (_, got):
        await got.value("tubing", 2.0)
        stamp = dt.datetime(2024, 5, 1, 8, 30, 15, 250000, tzinfo=dt.UTC)
        mark = got.mark()
        await station.set_value(1, "TubingPressure", 2.25, source_ts=stamp)
        reading = await got.value("tubing", 2.25, since=mark)
        assert reading.device == "station" and reading.reason is None
        assert reading.source_ts_ns == int(stamp.timestamp()) * 10**9 + 250_000_000
        assert reading.ts_ns > reading.source_ts_ns  # agent time is when it reached us


async def test_the_server_side_deadband_suppresses_small_changes(station: OpcUaStation) -> None:
    await station.set_value(2, "CasingPressure", 3.0)
    # A queue per item: without the deadband every small change would be delivered, none coalesced.
    point = OpcUaPoint(
        name="casing", node_id=station.node_id(2, "CasingPressure"), deadband_abs=0.5, queue_size=10
    )
    async with running(fast(station, point)) as (_, got):
        await got.value("casing", 3.0)
        mark = got.mark()
        for small in (3.2, 3.1, 3.3):
            await station.set_value(2, "CasingPressure", small)
        await station.set_value(2, "CasingPressure", 5.0)
        # Notifications of one monitored item arrive in order: had 3.2..3.3 been sent, they would be here.
        await got.value("casing", 5.0, since=mark)
        assert [r.value for r in got.of("casing", mark)] == [5.0]


async def test_polling_reads_every_period_and_applies_the_deadband_itself(station: OpcUaStation) -> None:
    await station.set_value(3, "CasingPressure", 3.0)
    await station.set_value(3, "Temperature", 40.0)
    points = (
        OpcUaPoint(name="casing", node_id=station.node_id(3, "CasingPressure"), deadband_abs=0.5),
        OpcUaPoint(name="temperature", node_id=station.node_id(3, "Temperature")),
    )
    async with running(fast(station, *points, mode="poll")) as (_, got):
        await got.value("casing", 3.0)
        mark = got.mark()
        await station.set_value(3, "CasingPressure", 3.2)
        # Points of one period are read together: two more temperature samples prove casing was read
        # with 3.2 at least once since — and the deadband must have held it back.
        await got.count("temperature", 2, since=mark)
        assert got.of("casing", mark) == []
        await station.set_value(3, "CasingPressure", 3.6)  # 0.6 from the last reported 3.0
        await got.value("casing", 3.6, since=mark)


async def test_a_server_refusing_subscriptions_is_polled_instead() -> None:
    async with OpcUaStation(
        "127.0.0.1", free_port(), wells=1, update_interval_s=None, max_subscriptions=0
    ) as nano:
        point = OpcUaPoint(name="flow", node_id=nano.node_id(1, "FlowRate"))
        async with running(fast(nano, point)) as (_, got):
            mark = got.mark()
            await got.count("flow", 3, since=mark)  # polls repeat; a subscription would send one value
            await nano.set_value(1, "FlowRate", 12.5)
            await got.value("flow", 12.5)


async def test_browse_paths_resolve_to_the_same_variable_as_its_node_id(station: OpcUaStation) -> None:
    await station.set_value(4, "FlowRate", 31.5)
    points = (
        OpcUaPoint(name="by_id", node_id=station.node_id(4, "FlowRate")),
        OpcUaPoint(name="by_path", browse_path=station.browse_path(4, "FlowRate")),
    )
    async with running(fast(station, *points)) as (_, got):
        await got.value("by_id", 31.5)
        await got.value("by_path", 31.5)
        mark = got.mark()
        await station.set_value(4, "FlowRate", 29.0)
        await got.value("by_path", 29.0, since=mark)


async def test_addresses_that_do_not_resolve_are_bad_with_the_server_reason_and_the_rest_runs(
    station: OpcUaStation,
) -> None:
    ns = station.namespace_index
    points = (
        OpcUaPoint(name="ghost", node_id=f"ns={ns};s=Well99.Nothing"),
        OpcUaPoint(name="lost", browse_path=f"{ns}:GatheringStation/{ns}:Well99/{ns}:Setpoint"),
        OpcUaPoint(name="run", node_id=station.node_id(5, "RunStatus")),
    )
    async with running(fast(station, *points)) as (_, got):
        ghost = await got.wait_for(lambda r: r.point == "ghost")
        lost = await got.wait_for(lambda r: r.point == "lost")
        await got.value("run", True)
        assert (ghost.quality, ghost.reason, ghost.value) == (Quality.BAD, "BadNodeIdUnknown", None)
        assert lost.quality is Quality.BAD and lost.reason in ("BadNoMatch", "BadNodeIdUnknown")


async def test_status_codes_become_quality_with_the_status_name_as_reason(station: OpcUaStation) -> None:
    await station.set_value(6, "Temperature", 41.0)
    point = OpcUaPoint(name="temperature", node_id=station.node_id(6, "Temperature"))
    async with running(fast(station, point)) as (_, got):
        await got.value("temperature", 41.0)
        mark = got.mark()
        await station.set_value(6, "Temperature", 41.5, status="UncertainLastUsableValue")
        uncertain = await got.wait_for(lambda r: r.quality is Quality.UNCERTAIN, since=mark)
        assert (uncertain.value, uncertain.reason) == (41.5, "UncertainLastUsableValue")
        await station.set_value(6, "Temperature", 0.0, status="BadSensorFailure")
        bad = await got.wait_for(lambda r: r.quality is Quality.BAD, since=mark)
        assert (bad.value, bad.reason) == (None, "BadSensorFailure")
        await station.set_value(6, "Temperature", 42.0)
        good = await got.value("temperature", 42.0, since=mark)
        assert good.reason is None


async def test_a_write_is_confirmed_by_reading_it_back(station: OpcUaStation) -> None:
    points = (
        OpcUaPoint(name="setpoint", node_id=station.node_id(7, "Setpoint"), writable=True),
        OpcUaPoint(name="flow", node_id=station.node_id(7, "FlowRate")),
        OpcUaPoint(name="tubing", node_id=station.node_id(7, "TubingPressure"), writable=True),
    )
    async with running(fast(station, *points)) as (driver, got):
        await got.wait_for(lambda r: r.point == "setpoint" and r.quality is Quality.GOOD)
        reading = await driver.write("station/setpoint", 42)  # an int, written as the node's Double
        assert (reading.quality, reading.value, reading.reason) == (Quality.GOOD, 42.0, None)
        assert await station.read_value(7, "Setpoint") == 42.0
        refused = await driver.write("tubing", 9.0)  # configured writable, but read-only on the server
        assert refused.quality is Quality.BAD and refused.reason in ("BadNotWritable", "BadUserAccessDenied")
        wrong_type = await driver.write("setpoint", "fast")
        assert (wrong_type.quality, wrong_type.reason) == (Quality.BAD, "BadTypeMismatch")
        with pytest.raises(ValueError, match="not writable"):
            await driver.write("flow", 1.0)
        with pytest.raises(KeyError):
            await driver.write("station/nothing", 1.0)


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_basic256sha256_with_a_generated_client_certificate_and_a_user_login_reads_values(
    secure_station: OpcUaStation, tmp_path: Path, mode: str
) -> None:
    await secure_station.set_value(1, "FlowRate", 18.0)
    cfg = fast(
        secure_station,
        OpcUaPoint(name="flow", node_id=secure_station.node_id(1, "FlowRate")),
        security_policy="Basic256Sha256",
        security_mode=mode,
        cert_dir=str(tmp_path / "pki"),
        username="operator",
        password="s3cret",
    )
    async with running(cfg) as (_, got):
        await got.value("flow", 18.0)
    key = tmp_path / "pki" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and (tmp_path / "pki" / "cert.der").exists()


async def test_a_pinned_server_certificate_that_matches_lets_the_client_in(
    secure_station: OpcUaStation, tmp_path: Path
) -> None:
    assert secure_station.server_certificate is not None
    await secure_station.set_value(1, "Temperature", 47.5)
    cfg = fast(
        secure_station,
        OpcUaPoint(name="t", node_id=secure_station.node_id(1, "Temperature")),
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        cert_dir=str(tmp_path),
        server_certificate=str(secure_station.server_certificate),
        username="operator",
        password="s3cret",
    )
    async with running(cfg) as (_, got):
        await got.value("t", 47.5)


async def test_a_wrong_password_yields_bad_readings_with_a_reason_and_no_crash(
    secure_station: OpcUaStation, tmp_path: Path
) -> None:
    cfg = fast(
        secure_station,
        OpcUaPoint(name="flow", node_id=secure_station.node_id(1, "FlowRate")),
        OpcUaPoint(name="run", node_id=secure_station.node_id(1, "RunStatus")),
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        cert_dir=str(tmp_path),
        username="operator",
        password="guess",
    )
    refused_before = secure_station.refused_logins
    async with running(cfg) as (_, got):
        flow = await got.wait_for(lambda r: r.point == "flow")
        run = await got.wait_for(lambda r: r.point == "run")
        assert (flow.quality, flow.value, flow.reason) == (Quality.BAD, None, "BadUserAccessDenied")
        assert run.reason == "BadUserAccessDenied"
        # The driver keeps retrying (running() asserts it is alive) without repeating the same news.
        async with asyncio.timeout(WAIT_S):
            await secure_station.wait_refused_logins(refused_before + 3)
        assert len(got.of("flow")) == 1


async def test_the_driver_reconnects_and_resubscribes_after_a_server_restart() -> None:
    port = free_port()
    first = OpcUaStation("127.0.0.1", port, wells=1, update_interval_s=None)
    await first.start()
    try:
        await first.set_value(1, "TubingPressure", 1.5)
        cfg = fast(
            first,
            OpcUaPoint(name="tubing", node_id=first.node_id(1, "TubingPressure")),
            OpcUaPoint(name="setpoint", browse_path=first.browse_path(1, "Setpoint"), writable=True),
        )
        async with running(cfg) as (driver, got):
            await got.value("tubing", 1.5)
            mark = got.mark()
            await first.stop()
            down = await got.wait_for(lambda r: r.point == "tubing" and r.quality is Quality.BAD, since=mark)
            assert down.reason
            async with OpcUaStation("127.0.0.1", port, wells=1, update_interval_s=None) as second:
                await second.set_value(1, "TubingPressure", 1.75)
                await got.value("tubing", 1.75, since=mark)  # new session, new subscription
                mark = got.mark()
                await second.set_value(1, "TubingPressure", 1.8)
                await got.value("tubing", 1.8, since=mark)
                # Browse paths were resolved again against the new server: writes reach it.
                assert (await driver.write("setpoint", 27.0)).value == 27.0
                assert await second.read_value(1, "Setpoint") == 27.0
    finally:
        await first.stop()
