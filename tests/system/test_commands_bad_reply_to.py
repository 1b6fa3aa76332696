"""System: commands whose reply route is not a topic an answer can go to, sent to an `edge-agent run` process
through our broker: the agent answers on its default reply topic and stays up."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cloud_broker.operator import OperatorClient, connect
from tests.integration.commands_support import AGENT_ID, broker_process, config_doc, toml
from tests.system.test_ops_agent_process import start_agent, status_of, tail
from uplink.schema.commands import Response, decode_response
from uplink.schema.topics import AgentTopics

pytestmark = pytest.mark.system
broker_port = pytest.fixture(name="broker_port")(broker_process)
TOPICS = AgentTopics(AGENT_ID)
ANSWER_TIMEOUT_S = 15.0

BAD_ROUTES: dict[str, dict[str, object]] = {
    "wildcard": {"id": "c-wild", "name": "agent.status", "reply_to": "ops/+/x"},
    "multi-level wildcard": {"id": "c-hash", "name": "agent.status", "reply_to": "ops/#"},
    "over 65535 bytes": {"id": "c-long", "name": "agent.status", "reply_to": "r" * 70_000},
    "NUL character": {"id": "c-nul", "name": "agent.status", "reply_to": "ops/\u0000"},
    # Not a command envelope (an unknown field): answered from what peek_id could read, reply_to included.
    "unparsable": {"v": 1, "id": "c-unparsable", "name": "status.get", "reply_to": "ops/+/x"},
}


async def answer_for(op: OperatorClient, cid: str) -> tuple[str, Response]:
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        while True:
            msg = await op.next_message()
            resp = decode_response(msg.payload)
            if resp.id == cid and resp.final:
                return msg.topic, resp


@pytest.mark.timeout(90)
async def test_commands_with_an_invalid_reply_to_are_answered_on_the_default_reply_topic_and_the_agent_lives(
    tmp_path: Path, broker_port: int
) -> None:
    proc = start_agent(tmp_path, toml(config_doc(tmp_path / "data", broker_port, [], version="v1")))
    try:
        await status_of(broker_port, "online")
        async with connect("127.0.0.1", broker_port, client_id="op-bad-reply") as op:
            assert await op.subscribe(TOPICS.reply) < 0x80
            for case, command in BAD_ROUTES.items():
                await op.publish(TOPICS.command, json.dumps(command).encode(), qos=1)
                topic, resp = await answer_for(op, str(command["id"]))
                assert topic == TOPICS.reply, case
                assert resp.code.value == ("invalid" if case == "unparsable" else "ok"), (case, resp)
                assert proc.poll() is None, f"{case}: agent exited\n{tail(tmp_path / 'agent.log')}"
            # And a well-formed command after all that is still served.
            good = {"id": "c-good", "name": "agent.status"}
            await op.publish(TOPICS.command, json.dumps(good).encode(), qos=1)
            topic, resp = await answer_for(op, "c-good")
            assert (topic, resp.code.value) == (TOPICS.reply, "ok")
        assert proc.poll() is None, tail(tmp_path / "agent.log")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
