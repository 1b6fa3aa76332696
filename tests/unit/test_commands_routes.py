"""CommandProcessor: reply routes from the request are validated, and handle() is a supervisor boundary."""

from __future__ import annotations

import pytest

from agent.commands import Outcome, Progress
from tests.unit.test_commands_processor import TOPICS, message, processor
from uplink.client import UplinkClosed
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import Properties, ReasonCode
from uplink.schema.commands import Command, ResultCode


async def ok(cmd: Command, progress: Progress) -> Outcome:
    return Outcome(ResultCode.OK, "ok")


@pytest.mark.parametrize("reply_to", ["ops/+/x", "ops/#", "", "a" * 70_000, "ops/\u0000"])
async def test_a_reply_to_that_is_no_topic_name_is_answered_on_the_default_reply_topic(reply_to: str) -> None:
    proc, replies = processor({"config.get": ok})
    await proc.handle(message({"id": "a", "name": "config.get", "reply_to": reply_to, "correlation": "c"}))
    assert [(t, r.code, r.correlation) for t, r, _ in replies.sent] == [(TOPICS.reply, ResultCode.OK, "c")]


async def test_an_unparsable_command_with_a_wildcard_reply_to_is_answered_on_the_default_topic() -> None:
    proc, replies = processor({"config.get": ok})
    await proc.handle(message({"v": 1, "id": "u", "name": "status.get", "reply_to": "ops/+/x"}))
    assert [(t, r.id, r.code) for t, r, _ in replies.sent] == [(TOPICS.reply, "u", ResultCode.INVALID)]


async def test_an_invalid_response_topic_falls_back_to_the_default_topic_with_its_correlation_data() -> None:
    proc, replies = processor({"config.get": ok})
    await proc.handle(
        message({"id": "p", "name": "config.get"}, response_topic="ops/+", correlation_data=b"k")
    )
    assert [(t, p.correlation_data) for t, _, p in replies.sent] == [(TOPICS.reply, b"k")]


@pytest.mark.parametrize(
    "failure",
    [
        LocalProtocolError("PUBLISH too large", ReasonCode.PACKET_TOO_LARGE),
        UplinkClosed("agent stopping"),
        RuntimeError("a bug in the reply path"),
    ],
)
async def test_an_answer_the_link_cannot_send_is_dropped_and_handle_returns(
    failure: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    proc, replies = processor({"config.get": ok})

    async def broken_reply(topic: str, payload: bytes, props: Properties) -> None:
        raise failure

    proc._reply = broken_reply  # our own seam: the reply callable
    await proc.handle(message({"id": "x", "name": "config.get"}))  # must not raise
    assert "not sent" in caplog.text or "failed" in caplog.text
    # The answer was stored before sending: a re-delivery gets it (here through a working link).
    proc._reply = replies
    await proc.handle(message({"id": "x", "name": "config.get"}))
    assert [(r.id, r.code) for _, r, _ in replies.sent] == [("x", ResultCode.OK)]
    assert proc.stats.duplicates == 1
