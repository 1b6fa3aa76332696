"""The agent with its OPC UA and serial drivers: station + T-Box -> queue -> our broker -> subscriber.

Real parts only: an asyncua gathering station, the T-Box simulator writing NMEA and SLCAN into socat pty
pairs, our broker as a process, the agent in this process built from a TOML config, and a subscriber on
the broker decoding the batches by their (generation, seq) keys.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.config import parse_toml
from hil.net import free_port
from hil.opcua_station import OpcUaStation
from hil.pty import pty_pair
from hil.tbox import DEFAULT_DBC, TboxSimulator
from tests.conftest import require_binary
from tests.integration.commands_support import broker_process, toml
from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.packets import Publish
from uplink.schema.records import TelemetryRecord, decode_batch
from uplink.schema.topics import AgentTopics, parse_data_topic

pytestmark = pytest.mark.integration
AGENT_ID = "tbox-test-1"
WAIT_S = 20.0


@pytest.fixture(name="broker_port")
def _broker_port(tmp_path: Path) -> Iterator[int]:
    yield from broker_process(tmp_path)


class Subscriber:
    """Every telemetry value the cloud side received, by (device, point), and the keys it saw."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], list[Any]] = {}
        self.keys: set[tuple[str, int]] = set()
        self.changed = asyncio.Event()

    def add(self, msg: Publish) -> None:
        parsed = parse_data_topic(msg.topic)
        if parsed is None or parsed[1] != "telemetry":
            return
        batch = decode_batch(msg.payload, msg.properties)
        for item in batch.items:
            self.keys.add((batch.gen, item.seq))
            rec = item.record
            assert isinstance(rec, TelemetryRecord)
            for pv in rec.values:
                if pv.quality == "GOOD":
                    self.values.setdefault((rec.device, pv.name), []).append(pv.value)
        self.changed.set()

    async def wait_for(self, wanted: set[tuple[str, str]]) -> None:
        try:
            async with asyncio.timeout(WAIT_S):
                while not wanted <= self.values.keys():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            missing = sorted(wanted - self.values.keys())
            raise AssertionError(f"never received GOOD values of {missing}") from None


@contextlib.asynccontextmanager
async def subscriber(broker_port: int) -> AsyncIterator[Subscriber]:
    sub = Subscriber()
    link = Uplink(UplinkConfig(host="127.0.0.1", port=broker_port, client_id="cloud-sub", clean_start=True))
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(link.run(), name="subscriber-link")
        async with asyncio.timeout(10):
            await link.wait_connected()
        await link.subscribe([(AgentTopics(AGENT_ID).data("#"), 1)])

        async def consume() -> None:
            async for msg in link.inbound():
                sub.add(msg)

        consumer = tg.create_task(consume(), name="subscriber")
        try:
            yield sub
        finally:
            consumer.cancel()
            await link.close()
            runner.cancel()


@contextlib.asynccontextmanager
async def running_agent(doc: dict[str, Any]) -> AsyncIterator[Agent]:
    agent = Agent(parse_toml(toml(doc)))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(agent.run(), name="agent-under-test")
        try:
            yield agent
        finally:
            agent.stop()
            async with asyncio.timeout(20):
                await asyncio.wait([task])
    assert agent.exit_code == 0


def config(tmp_path: Path, broker_port: int, station: OpcUaStation) -> dict[str, Any]:
    return {
        "agent": {"id": AGENT_ID, "data_dir": str(tmp_path / "agent"), "drain_on_stop_s": 1.0},
        "uplink": {
            "host": "127.0.0.1",
            "port": broker_port,
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 0.5,
        },
        "pipeline": {"flush_interval_s": 0.02},
        "opcua": [
            {
                "name": "station",
                "endpoint": station.endpoint,
                "publishing_interval_s": 0.1,
                "points": [
                    {"name": "tubing_mpa", "node_id": station.node_id(1, "TubingPressure")},
                    {"name": "flow_m3d", "browse_path": station.browse_path(1, "FlowRate")},
                    {"name": "setpoint", "node_id": station.node_id(1, "Setpoint"), "writable": True},
                ],
            }
        ],
        "serial": [
            {
                "name": "gps",
                "port": str(tmp_path / "gps"),
                "protocol": {"kind": "nmea"},
                "reopen_initial_s": 0.05,
                "reopen_max_s": 0.2,
            },
            {
                "name": "can",
                "port": str(tmp_path / "can"),
                "baudrate": 115200,
                "protocol": {"kind": "slcan", "dbc": str(DEFAULT_DBC), "signals": ["EngineSpeed", "SOC"]},
                "report_interval_s": 0.2,
                "reopen_initial_s": 0.05,
                "reopen_max_s": 0.2,
            },
        ],
    }


async def test_opcua_and_serial_readings_reach_a_cloud_subscriber_through_the_queue(
    tmp_path: Path, broker_port: int
) -> None:
    require_binary("socat")
    async with (
        OpcUaStation(port=free_port(), wells=1, update_interval_s=0.1) as station,
        pty_pair(tmp_path / "gps.sim", tmp_path / "gps"),
        pty_pair(tmp_path / "can.sim", tmp_path / "can"),
        subscriber(broker_port) as sub,
    ):
        sim = TboxSimulator(str(tmp_path / "gps.sim"), str(tmp_path / "can.sim"), nmea_interval_s=0.2)
        async with asyncio.TaskGroup() as tg:
            sim_task = tg.create_task(sim.run(), name="tbox")
            async with running_agent(config(tmp_path, broker_port, station)) as agent:
                await sub.wait_for(
                    {
                        ("station", "tubing_mpa"),
                        ("station", "flow_m3d"),
                        ("gps", "lat_deg"),
                        ("gps", "satellites"),
                        ("can", "EngineSpeed"),
                        ("can", "SOC"),
                    }
                )
                # One driver per server and per port, each its own task (so a config change restarts
                # only what changed).
                assert set(agent.opcua_drivers) == {"station"}
                assert set(agent.serial_drivers) == {"gps", "can"}
            sim_task.cancel()
    assert sub.values[("gps", "satellites")][-1] == 9
    assert all(v in sim.sent["EngineSpeed"] for v in sub.values[("can", "EngineSpeed")])
    # Everything came through the durable queue: each record has its own (generation, seq) key.
    assert len({gen for gen, _ in sub.keys}) == 1


async def test_a_point_write_to_an_opcua_server_is_routed_by_device_and_refused_for_a_serial_port(
    tmp_path: Path, broker_port: int
) -> None:
    from agent.ops import Operations
    from uplink.schema.commands import Command, CommandError, ResultCode

    async def no_progress(note: str) -> None:
        pass

    def write(point: str, value: float) -> Command:
        return Command(id=f"w-{point}", name="point.write", args={"point": point, "value": value})

    station = OpcUaStation(port=free_port(), wells=1, update_interval_s=None)
    async with station:
        doc = config(tmp_path, broker_port, station)
        del doc["serial"][1]  # no CAN needed here
        async with running_agent(doc) as agent:
            connected = asyncio.Event()
            agent.add_tap(
                lambda r: connected.set() if r.device == "station" and r.quality == "GOOD" else None
            )
            async with asyncio.timeout(WAIT_S):
                await connected.wait()
            ops = Operations(agent)
            ok = await ops.point_write(write("station/setpoint", 42.5), no_progress)
            assert ok.code == ResultCode.OK, ok.message
            assert await station.read_value(1, "Setpoint") == 42.5
            with pytest.raises(CommandError) as info:
                await ops.point_write(write("gps/lat_deg", 1.0), no_progress)
            assert info.value.code == ResultCode.INVALID
