"""Transactional config over the real broker: applied and reported, rejected by field, rolled back."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.net import free_port
from hil.wellsite import Wellsite
from tests.integration.commands_support import (
    ask,
    broker_process,
    config_doc,
    device,
    operator,
    running_agent,
    toml,
    wait_for,
    wellsite,
)
from uplink.schema.commands import Response, ResultCode

pytestmark = pytest.mark.integration
broker_port = pytest.fixture(name="broker_port")(broker_process)
site = pytest.fixture(name="site")(wellsite)


async def test_a_good_config_is_applied_committed_and_reported(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    data = tmp_path / "agent"
    base = config_doc(data, broker_port, [device(site, 0)], version="1")
    async with running_agent(base) as agent, operator(broker_port) as op:
        new = config_doc(data, broker_port, [device(site, 0), device(site, 1)], version="2")
        notes: list[Response] = []
        resp = await ask(op, "config.apply", {"config": toml(new)}, on_progress=notes.append)
        assert resp.code == ResultCode.OK, resp.message
        assert resp.result is not None and resp.result["version"] == "2"
        assert resp.result["changed"] == ["modbus"]
        assert notes and all(not n.final for n in notes)
        assert agent.cfg.version == "2"
        got = await ask(op, "config.get")
        assert (
            got.result is not None
            and got.result["version"] == "2"
            and 'version = "2"' in got.result["config"]
        )
        # Only the new device's bus was started: well-001 and well-002 share one TCP port of the site,
        # so their bus restarted; both produce GOOD readings.
        assert agent.pipeline is not None
        await wait_for(
            lambda: (
                agent.pipeline.stats.devices.get("well-002") is not None
                and agent.pipeline.stats.devices["well-002"].good > 0
            )
        )
    assert (data / "config" / "current.toml").read_text().count('version = "2"') == 1
    assert not (data / "config" / "pending.toml").exists()
    # The committed config wins over the base file at the next start.
    async with running_agent(base) as agent:
        assert agent.cfg.version == "2" and agent.config_source == "pushed"


async def test_an_invalid_config_is_rejected_naming_the_field_and_the_old_one_keeps_running(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    data = tmp_path / "agent"
    base = config_doc(data, broker_port, [device(site, 0)], version="1")
    async with running_agent(base) as agent, operator(broker_port) as op:
        bad = config_doc(data, broker_port, [device(site, 0), device(site, 1, timeout_s="soon")], version="2")
        resp = await ask(op, "config.apply", {"config": toml(bad)})
        assert resp.code == ResultCode.INVALID
        assert "modbus[1].timeout_s" in resp.message
        assert resp.result is not None and resp.result["path"] == "modbus[1].timeout_s"
        unversioned = config_doc(data, broker_port, [device(site, 0)], version="x")
        del unversioned["version"]
        resp = await ask(op, "config.apply", {"config": toml(unversioned)})
        assert resp.code == ResultCode.INVALID and "version" in resp.message
        moved = config_doc(tmp_path / "elsewhere", broker_port, [device(site, 0)], version="3")
        resp = await ask(op, "config.apply", {"config": toml(moved)})
        assert resp.code == ResultCode.INVALID and "agent.data_dir" in resp.message
        resp = await ask(op, "config.apply", {"config": "this is [not toml"})
        assert resp.code == ResultCode.INVALID and "TOML" in resp.message
        assert agent.cfg.version == "1"
        assert (await ask(op, "config.get")).result["version"] == "1"  # type: ignore[index]
    assert not (data / "config" / "current.toml").exists()


async def test_a_config_whose_new_device_never_reads_good_is_rolled_back(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    data = tmp_path / "agent"
    base = config_doc(data, broker_port, [device(site, 0)], version="1")
    async with running_agent(base) as agent, operator(broker_port) as op:
        dead = {**device(site, 1), "name": "ghost", "port": free_port()}  # nobody listens there
        new = config_doc(data, broker_port, [device(site, 0), dead], version="2")
        resp = await ask(op, "config.apply", {"config": toml(new), "gate_s": 1.5})
        assert resp.code == ResultCode.ROLLED_BACK, resp.message
        assert "ghost" in resp.message and "version 1" in resp.message
        assert agent.cfg.version == "1"
        assert all(d.name != "ghost" for drv, _ in agent.bus_drivers.values() for d in drv.devices)
        assert (data / "config" / "rejected.toml").exists()
        assert not (data / "config" / "pending.toml").exists()
        # The old device still runs after the rollback.
        assert agent.pipeline is not None
        before = agent.pipeline.stats.devices["well-001"].good
        await wait_for(lambda: agent.pipeline.stats.devices["well-001"].good > before)


async def test_a_config_that_cuts_the_agent_off_from_the_broker_is_rolled_back(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    data = tmp_path / "agent"
    base = config_doc(data, broker_port, [device(site, 0)], version="1")
    async with running_agent(base) as agent, operator(broker_port) as op:
        cut = config_doc(data, free_port(), [device(site, 0)], version="2")
        resp = await ask(op, "config.apply", {"config": toml(cut), "gate_s": 1.5})
        assert resp.code == ResultCode.ROLLED_BACK, resp.message
        assert "uplink" in resp.message
        assert agent.cfg.version == "1" and agent.link.connected
        assert agent.link.current is not None and agent.link.current.config.port == broker_port
        # Still reachable with the old settings: commands keep working.
        assert (await ask(op, "agent.status")).code == ResultCode.OK


async def test_a_dry_run_reads_the_new_devices_and_changes_nothing(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    data = tmp_path / "agent"
    base = config_doc(data, broker_port, [device(site, 0)], version="1")
    async with running_agent(base) as agent, operator(broker_port) as op:
        good = config_doc(data, broker_port, [device(site, 0), device(site, 1)], version="2")
        resp = await ask(op, "config.apply", {"config": toml(good), "dry_run": True})
        assert resp.code == ResultCode.OK and resp.result is not None and resp.result["dry_run"] is True
        dead = {**device(site, 1), "name": "ghost", "port": free_port()}
        bad = config_doc(data, broker_port, [device(site, 0), dead], version="3")
        resp = await ask(op, "config.apply", {"config": toml(bad), "dry_run": True})
        assert resp.code == ResultCode.FAILED and "modbus[1] ghost/" in resp.message
        assert agent.cfg.version == "1"
    assert not (data / "config" / "current.toml").exists()
