"""CommandProcessor with a recording reply seam: routing, one answer, idempotency, contained failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from agent.commands import CommandProcessor, Outcome, Progress
from agent.config import CommandsSection
from uplink.mqtt.packets import Properties, Publish
from uplink.schema.commands import Command, Response, ResultCode, decode_response
from uplink.schema.topics import AgentTopics

TOPICS = AgentTopics("well-1")


class Replies:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Response, Properties]] = []

    async def __call__(self, topic: str, payload: bytes, props: Properties) -> None:
        self.sent.append((topic, decode_response(payload), props))

    def finals(self) -> list[Response]:
        return [r for _, r, _ in self.sent if r.final]


def message(body: dict[str, object], **props: object) -> Publish:
    return Publish(TOPICS.command, msgspec.json.encode(body), qos=1, properties=Properties(**props))  # type: ignore[arg-type]


def processor(
    handlers: dict[str, object], tmp_path: Path | None = None, **settings: object
) -> tuple[CommandProcessor, Replies]:
    replies = Replies()
    proc = CommandProcessor(TOPICS, CommandsSection(**settings), handlers, replies, state_dir=tmp_path)  # type: ignore[arg-type]
    return proc, replies


async def test_an_mqtt5_command_is_answered_once_on_its_response_topic_with_its_correlation_data() -> None:
    calls = []

    async def status(cmd: Command, progress: Progress) -> Outcome:
        calls.append(cmd.id)
        await progress("looking")
        return Outcome(ResultCode.OK, "fine", {"x": 1})

    proc, replies = processor({"agent.status": status})
    await proc.handle(
        message({"id": "a1", "name": "agent.status"}, response_topic="ops/r", correlation_data=b"k")
    )
    assert calls == ["a1"]
    assert [(t, r.final, p.correlation_data) for t, r, p in replies.sent] == [
        ("ops/r", False, b"k"),
        ("ops/r", True, b"k"),
    ]
    assert replies.finals()[0].result == {"x": 1} and replies.finals()[0].code == ResultCode.OK


async def test_an_mqtt311_command_is_answered_on_reply_to_or_the_default_reply_topic() -> None:
    async def ok(cmd: Command, progress: Progress) -> Outcome:
        return Outcome(ResultCode.OK, "ok")

    proc, replies = processor({"config.get": ok})
    await proc.handle(message({"id": "a", "name": "config.get", "reply_to": "ops/x", "correlation": "c9"}))
    await proc.handle(message({"id": "b", "name": "config.get"}))
    assert [(t, r.correlation) for t, r, _ in replies.sent] == [("ops/x", "c9"), (TOPICS.reply, None)]


async def test_a_redelivered_command_gets_the_stored_answer_and_does_not_run_again(tmp_path: Path) -> None:
    runs = 0

    async def write(cmd: Command, progress: Progress) -> Outcome:
        nonlocal runs
        runs += 1
        return Outcome(ResultCode.OK, f"run {runs}")

    proc, replies = processor({"point.write": write}, tmp_path)
    body = {"id": "w1", "name": "point.write", "args": {"point": "d/p", "value": 1}}
    await proc.handle(message(body))
    await proc.handle(message(body))
    assert runs == 1 and [r.message for r in replies.finals()] == ["run 1", "run 1"]
    # The answers are durable: a new processor (after a restart) still knows it.
    again, replies2 = processor({"point.write": write}, tmp_path)
    again.load_state()
    await again.handle(message(body))
    assert runs == 1 and replies2.finals()[0].message == "run 1"


async def test_a_command_redelivered_while_it_runs_is_not_started_twice() -> None:
    gate = asyncio.Event()
    runs = 0

    async def slow(cmd: Command, progress: Progress) -> Outcome:
        nonlocal runs
        runs += 1
        await gate.wait()
        return Outcome(ResultCode.OK, "done")

    proc, replies = processor({"config.apply": slow})
    body = {"id": "s", "name": "config.apply", "args": {}}
    async with asyncio.TaskGroup() as tg:
        tg.create_task(proc.handle(message(body)), name="first")
        await asyncio.sleep(0)
        await proc.handle(message(body))
        gate.set()
    assert runs == 1 and len(replies.finals()) == 1


async def test_a_handler_that_crashes_is_answered_failed_and_the_processor_keeps_serving() -> None:
    async def boom(cmd: Command, progress: Progress) -> Outcome:
        raise RuntimeError("bug")

    async def ok(cmd: Command, progress: Progress) -> Outcome:
        return Outcome(ResultCode.OK, "ok")

    proc, replies = processor({"card.capture": boom, "config.get": ok})
    await proc.handle(message({"id": "x", "name": "card.capture", "args": {"device": "d"}}))
    await proc.handle(message({"id": "y", "name": "config.get"}))
    await proc.handle(message({"id": "z", "name": "file.upload"}))
    codes = [(r.id, r.code) for r in replies.finals()]
    assert codes == [("x", ResultCode.FAILED), ("y", ResultCode.OK), ("z", ResultCode.UNSUPPORTED)]
    assert "RuntimeError" in replies.finals()[0].message
    assert proc.stats.by_code == {"failed": 1, "ok": 1, "unsupported": 1}


async def test_after_runs_only_once_the_answer_was_sent() -> None:
    order: list[str] = []

    async def restart(cmd: Command, progress: Progress) -> Outcome:
        return Outcome(ResultCode.OK, "bye", after=lambda: order.append("after"))

    async def reply(topic: str, payload: bytes, props: Properties) -> None:
        order.append("answer")

    proc = CommandProcessor(TOPICS, CommandsSection(), {"agent.restart": restart}, reply)
    await proc.handle(message({"id": "r", "name": "agent.restart"}))
    assert order == ["answer", "after"]
