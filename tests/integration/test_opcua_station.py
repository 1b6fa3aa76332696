"""The HIL gathering station: a live process model that our driver (and any OPC UA client) can read."""

from __future__ import annotations

import argparse

import pytest

from drivers.base import Quality
from drivers.opcua.config import OpcUaPoint, OpcUaServer
from hil import opcua_station
from hil.net import free_port
from hil.opcua_station import OpcUaStation
from tests.integration.opcua_support import running

pytestmark = [pytest.mark.integration]


async def test_station_values_change_over_time_and_flow_follows_a_written_setpoint() -> None:
    async with OpcUaStation("127.0.0.1", free_port(), wells=2, update_interval_s=0.02, seed=7) as st:
        cfg = OpcUaServer(
            name="st",
            endpoint=st.endpoint,
            publishing_interval_s=0.05,
            points=(
                OpcUaPoint(name="tubing", node_id=st.node_id(2, "TubingPressure")),
                OpcUaPoint(name="flow", browse_path=st.browse_path(2, "FlowRate")),
                OpcUaPoint(name="setpoint", node_id=st.node_id(2, "Setpoint"), writable=True),
            ),
        )
        async with running(cfg) as (driver, got):
            await got.count("tubing", 3, since=0)
            assert len({r.value for r in got.of("tubing")}) >= 2
            assert (await driver.write("setpoint", 95.0)).value == 95.0
            mark = got.mark()
            # Flow starts near its old setpoint (20..60 m3/d) and converges on the new one.
            await got.wait_for(
                lambda r: (
                    r.point == "flow"
                    and r.quality is Quality.GOOD
                    and isinstance(r.value, float)
                    and r.value > 85.0
                ),
                since=mark,
            )


def test_the_station_is_an_edge_hil_subcommand() -> None:
    parser = argparse.ArgumentParser()
    opcua_station.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "opcua-station",
            "--port",
            "4841",
            "--wells",
            "8",
            "--security",
            "Basic256Sha256_SignAndEncrypt",
            "--user",
            "operator:s3cret",
        ]
    )
    assert args.main is opcua_station.main
    assert (args.port, args.wells, args.security, args.user) == (
        4841,
        8,
        ["Basic256Sha256_SignAndEncrypt"],
        [("operator", "s3cret")],
    )


def test_station_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="security"):
        OpcUaStation(security=("Basic128Rsa15",))
    with pytest.raises(ValueError, match="wells"):
        OpcUaStation(wells=0)
    with pytest.raises(KeyError):
        OpcUaStation(wells=2).node_id(3, "Setpoint")
