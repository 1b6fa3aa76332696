"""Retained status over the real broker: birth with versions, refreshed on change, offline on stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cloud_broker.operator import OperatorClient, fleet, fleet_table
from hil.wellsite import Wellsite
from tests.integration.commands_support import (
    AGENT_ID,
    ask,
    broker_process,
    config_doc,
    device,
    operator,
    running_agent,
    toml,
    wellsite,
)
from uplink.schema.commands import AgentStatus, ResultCode, decode_status
from uplink.schema.topics import AgentTopics

pytestmark = pytest.mark.integration
broker_port = pytest.fixture(name="broker_port")(broker_process)
site = pytest.fixture(name="site")(wellsite)
STATUS = AgentTopics(AGENT_ID).status


async def next_status(op: OperatorClient, timeout_s: float = 10.0) -> AgentStatus:
    async with asyncio.timeout(timeout_s):
        while True:
            msg = await op.next_message()
            if msg.topic == STATUS:
                return decode_status(msg.payload)


async def test_a_subscriber_sees_the_retained_birth_its_refresh_and_the_offline_on_a_clean_stop(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    doc = config_doc(tmp_path / "agent", broker_port, [device(site, 0)], version="7")
    async with operator(broker_port, "watcher") as watcher:
        async with running_agent(doc), operator(broker_port) as op:
            await watcher.subscribe(STATUS)
            birth = await next_status(watcher)
            assert birth.state == "online" and birth.agent == AGENT_ID
            assert birth.config_version == "7" and birth.versions["agent"]
            assert birth.link == "up" and birth.transport == "tcp" and birth.queue_depth is not None
            new = config_doc(tmp_path / "agent", broker_port, [device(site, 0), device(site, 1)], version="8")
            assert (await ask(op, "config.apply", {"config": toml(new)})).code == ResultCode.OK
            while (refreshed := await next_status(watcher)).config_version != "8":
                pass
            assert refreshed.state == "online"
            # A late subscriber (the fleet table) gets the retained birth at once.
            table = fleet_table(await fleet(op))
            assert AGENT_ID in table and "online" in table and " 8 " in table
        stopped = await next_status(watcher)
        assert stopped.state == "offline" and stopped.reason == "stopped"
