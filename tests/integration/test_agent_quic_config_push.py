"""config.apply moves a running agent onto QUIC; its health gate accepts only a link over QUIC."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.net import free_port
from hil.wellsite import Wellsite
from tests.integration.commands_support import (
    ask,
    config_doc,
    device,
    operator,
    running_agent,
    toml,
    wellsite,
)
from tests.integration.quic_support import make_pki, start_broker
from uplink.schema.commands import ResultCode

pytestmark = pytest.mark.integration
site = pytest.fixture(name="site")(wellsite)


async def test_a_pushed_quic_uplink_passes_the_gate_only_once_the_session_runs_over_quic(
        tmp_path: Path, site: Wellsite) -> None:
    pki = make_pki(tmp_path / "pki")
    broker = await start_broker(pki, tls=False)
    try:
        data = tmp_path / "agent"
        base = config_doc(data, broker.tcp_port, [device(site, 0)], version="1")
        async with running_agent(base) as agent, operator(broker.tcp_port) as op:
            assert agent.link.transport == "tcp"

            # No QUIC listener on this port: the new link never connects over QUIC, so the gate
            # fails and the agent rolls back to TCP.
            dead = config_doc(data, broker.tcp_port, [device(site, 0)], version="2")
            dead["uplink"].update(transport="quic", ca_file=pki.ca_file,
                                  quic={"port": free_port("udp"), "handshake_timeout_s": 0.5})
            resp = await ask(op, "config.apply", {"config": toml(dead), "gate_s": 2.0})
            assert resp.code == ResultCode.ROLLED_BACK, resp.message
            assert "over QUIC" in resp.message
            assert agent.cfg.version == "1"

            good = config_doc(data, broker.tcp_port, [device(site, 0)], version="3")
            good["uplink"].update(transport="quic", ca_file=pki.ca_file, quic={"port": broker.quic_port})
            resp = await ask(op, "config.apply", {"config": toml(good)})
            assert resp.code == ResultCode.OK, resp.message
            assert resp.result is not None and resp.result["transport"] == "quic"
            now: str | None = agent.link.transport  # (a property: mypy narrowed it to "tcp" above)
            assert now == "quic"
            status = await ask(op, "agent.status")
            assert status.result is not None
            assert status.result["transport"] == "quic"
            assert status.result["uplink"]["configured_transport"] == "quic"
    finally:
        await broker.close()
