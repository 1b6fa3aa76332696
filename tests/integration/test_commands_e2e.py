"""Commands over the real broker: one answer each, clear errors, idempotency, signatures and replays."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloud_broker.operator import new_command, request
from hil.wellsite import Wellsite
from tests.integration.commands_support import (
    AGENT_ID,
    ask,
    broker_process,
    config_doc,
    device,
    operator,
    running_agent,
    wait_for,
    wellsite,
)
from uplink.mqtt.packets import Properties
from uplink.schema.commands import ResultCode, decode_response, sign_command
from uplink.schema.topics import AgentTopics

pytestmark = pytest.mark.integration
broker_port = pytest.fixture(name="broker_port")(broker_process)
site = pytest.fixture(name="site")(wellsite)
TOPICS = AgentTopics(AGENT_ID)


def keypair() -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return key, base64.b64encode(raw).decode()


async def test_a_setpoint_write_is_confirmed_by_read_back_and_a_redelivery_is_not_run_twice(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    doc = config_doc(tmp_path / "agent", broker_port, [device(site, 0)])
    async with running_agent(doc), operator(broker_port) as op:
        cmd = new_command("point.write", {"point": "well-001/vfd_set_frequency", "value": 42.5})
        first = await ask(op, "point.write", cmd=cmd)
        assert first.code == ResultCode.OK, first.message
        assert first.result is not None and first.result["read_back"] == pytest.approx(42.5)
        assert site.well("well-001").value("vfd_set_frequency") == pytest.approx(42.5)
        site.well("well-001")._put("vfd_set_frequency", 10.0)  # if the command ran again, it would be 42.5
        again = await ask(op, "point.write", cmd=cmd)
        assert again.code == ResultCode.OK and again.ts_ns == first.ts_ns  # the stored answer
        assert site.well("well-001").value("vfd_set_frequency") == pytest.approx(10.0)
        refused = await ask(op, "point.write", {"point": "well-001/pump_fillage", "value": 1})
        assert refused.code == ResultCode.INVALID
        unknown = await ask(op, "point.write", {"point": "nowhere/x", "value": 1})
        assert unknown.code == ResultCode.INVALID and "nowhere" in unknown.message


async def test_card_capture_triggers_the_rtus_next_card_and_queues_each_card_once(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    # the schedule's card interval is long: every card after the first comes from the command
    doc = config_doc(tmp_path / "agent", broker_port, [device(site, 0, card={"interval_s": 3600.0})])
    well = site.well("well-001")
    async with running_agent(doc) as agent, operator(broker_port) as op:
        pipeline = agent.pipeline
        assert pipeline is not None
        await wait_for(lambda: pipeline.stats.cards_in == 1)  # the schedule's first capture
        cards_before = len(well.cards())
        notes: list[str] = []
        resp = await ask(
            op, "card.capture", {"device": "well-001"}, on_progress=lambda r: notes.append(r.message)
        )
        assert resp.code == ResultCode.OK, resp.message
        assert resp.result is not None and resp.result["triggered"] and resp.result["queued"]
        assert len(well.cards()) == cards_before + 1  # the RTU made a card for the trigger...
        assert resp.result["acquired_at_ns"] == well.cards()[-1].ts_ns  # ...and that card came back
        assert any("triggering a card on well-001" in n for n in notes)
        assert pipeline.stats.cards_in == 2
        held = await ask(op, "card.capture", {"device": "well-001", "trigger": False})
        assert held.code == ResultCode.OK and held.result is not None
        assert held.result["acquired_at_ns"] == resp.result["acquired_at_ns"] and not held.result["queued"]
        assert "already queued" in held.message and pipeline.stats.cards_in == 2
        no_card = await ask(op, "card.capture", {"device": "well-002"})
        assert no_card.code == ResultCode.INVALID and "well-002" in no_card.message
        wrong = await ask(op, "card.capture", {"device": "well-001", "trigger": "yes"})
        assert wrong.code == ResultCode.INVALID and "args.trigger" in wrong.message


async def test_unknown_and_malformed_commands_get_one_clear_error_each(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    doc = config_doc(tmp_path / "agent", broker_port, [device(site, 0)])
    async with running_agent(doc), operator(broker_port) as op:
        resp = await ask(op, "reboot.everything")
        assert resp.code == ResultCode.UNKNOWN_COMMAND and "config.apply" in resp.message
        resp = await ask(op, "point.write", {"point": "well-001/vfd_set_frequency"})
        assert resp.code == ResultCode.INVALID and "args.value" in resp.message
        # Not a command at all: answered on the MQTT 5 response topic with the correlation data echoed.
        reply = f"{TOPICS.reply}/raw"
        await op.subscribe(reply)
        await op.publish(
            TOPICS.command, b"{not json", properties=Properties(response_topic=reply, correlation_data=b"c-1")
        )
        msg = await op.next_message()
        assert msg.topic == reply and msg.properties.correlation_data == b"c-1"
        assert decode_response(msg.payload).code == ResultCode.INVALID
        status = await ask(op, "agent.status")
        assert status.code == ResultCode.OK and status.result is not None
        assert status.result["state"] == "online" and "well-001" in status.result["devices"]
        logs = await ask(op, "logs.fetch", {"lines": 5})
        assert logs.code in (ResultCode.OK, ResultCode.UNSUPPORTED)


async def test_an_mqtt_311_operator_gets_its_answer_on_the_reply_to_topic(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    doc = config_doc(tmp_path / "agent", broker_port, [device(site, 0)], protocol_level=4)
    async with running_agent(doc), operator(broker_port, protocol_level=4) as op:
        cmd = new_command("config.get", {})
        resp = await request(op, AGENT_ID, cmd, timeout_s=20)
        assert resp is not None and resp.code == ResultCode.OK and resp.correlation is not None


async def test_unsigned_forged_expired_and_replayed_control_commands_are_refused(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    key, public = keypair()
    other, _ = keypair()
    doc = config_doc(
        tmp_path / "agent",
        broker_port,
        [device(site, 0)],
        commands={"require_signed_control": True, "trusted_keys": {"ops": public}, "answers_kept": 1},
    )
    write = {"point": "well-001/vfd_set_frequency", "value": 30.0}
    async with running_agent(doc), operator(broker_port) as op:
        unsigned = await ask(op, "point.write", write)
        assert unsigned.code == ResultCode.UNAUTHORIZED and "signed" in unsigned.message
        forged = await ask(op, "point.write", cmd=new_command("point.write", write), signer=("ops", other))
        assert forged.code == ResultCode.UNAUTHORIZED and "signature" in forged.message
        unknown_key = await ask(op, "point.write", cmd=new_command("point.write", write), signer=("x", key))
        assert unknown_key.code == ResultCode.UNAUTHORIZED
        stale = new_command("point.write", write, now_ns=time.time_ns() - 600 * 10**9, validity_s=60)
        expired = await ask(op, "point.write", cmd=stale, signer=("ops", key))
        assert expired.code == ResultCode.EXPIRED
        assert site.well("well-001").value("vfd_set_frequency") != pytest.approx(30.0)

        signed = sign_command(
            key, AGENT_ID, msgspec.structs.replace(new_command("point.write", write), key_id="ops")
        )
        ok = await ask(op, "point.write", cmd=signed)
        assert ok.code == ResultCode.OK, ok.message
        assert site.well("well-001").value("vfd_set_frequency") == pytest.approx(30.0)
        # Push the answer out of the (1-entry) answer store, then replay the signed command verbatim.
        assert (await ask(op, "config.get")).code == ResultCode.OK
        site.well("well-001")._put("vfd_set_frequency", 12.0)
        replay = await ask(op, "point.write", cmd=signed)
        assert replay.code == ResultCode.REPLAYED
        assert site.well("well-001").value("vfd_set_frequency") == pytest.approx(12.0)
        # Read-only commands need no signature.
        assert (await ask(op, "agent.status")).code == ResultCode.OK

    # The nonce cache is durable: after a restart the replay is still refused.
    async with running_agent(doc), operator(broker_port) as op:
        again = await ask(op, "point.write", cmd=signed)
        assert again.code == ResultCode.REPLAYED
        assert site.well("well-001").value("vfd_set_frequency") == pytest.approx(12.0)
