"""Serve commands from the agent's command topic: route the answer, authorize, de-duplicate, dispatch.

Theory of operation. `CommandProcessor.handle(msg)` is called once per PUBLISH received on
`{prefix}/{agent}/cmd` and answers it exactly once with a final `Response` (uplink.schema.commands):

1. Routing: an MQTT 5 request names its Response Topic and Correlation Data as properties; an MQTT 3.1.1
   request names `reply_to` (and `correlation`) in the payload; without either the answer goes to the
   agent's default reply topic `{prefix}/{agent}/reply`. A route from the request is validated as an MQTT
   topic name first (no wildcards, not empty, at most 65535 bytes): an invalid one is logged and the
   answer goes to the default reply topic instead.
2. Parsing: a payload that is not a command envelope, or names an unknown command, is answered INVALID /
   UNKNOWN_COMMAND (with whatever id could be read) and goes no further.
3. Idempotency: the command id is the key. A re-delivered command whose answer is stored gets that answer
   again (to the route of the re-delivery) and is not run again; one still running is not started twice
   (its final answer is on its way). Answers are kept (in memory and in `{data_dir}/commands/answers.json`,
   so an answer survives an agent.restart) for the last `answers_kept` ids.
4. Authorization: with `require_signed_control`, control commands must carry a valid Ed25519 signature by
   a trusted key, must not be expired, and their nonce must be new (the nonce cache is persisted before
   the command runs, so a replay after a restart is still refused). A signature present on any command is
   always checked. Failures are answered UNAUTHORIZED / EXPIRED / REPLAYED and nothing runs.
5. Dispatch: the handler for the command's name returns an `Outcome`; `CommandError` from it becomes its
   code and message. This is a supervisor boundary: any other exception from a handler is logged with its
   traceback and answered FAILED, because the operator must get an answer and the agent must not die of
   one bad command. `handle` as a whole is one too (it runs as a task per message in the agent's
   TaskGroup): an answer the link cannot carry is logged and dropped, never raised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import CommandsSection
from store_forward.atomic import write_atomic
from uplink.client import UplinkClosed
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import NO_PROPERTIES, Properties, Publish
from uplink.mqtt.topics import TopicError, validate_topic_name
from uplink.schema.commands import (
    CONTENT_TYPE_RESPONSE,
    Command,
    CommandError,
    NonceCache,
    Response,
    ResultCode,
    decode_command,
    encode_json,
    load_public_key,
    peek_id,
    verify_command,
)
from uplink.schema.topics import AgentTopics

log = logging.getLogger(__name__)
PROGRESS_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Outcome:
    code: ResultCode
    message: str
    result: dict[str, Any] | None = None
    after: Callable[[], None] | None = None  # run once the answer was acknowledged (agent.restart)


@dataclass(frozen=True, slots=True)
class Route:
    """Where an answer goes: topic, MQTT 5 correlation data, 3.1.1 payload correlation."""

    topic: str
    correlation_data: bytes | None = None
    correlation: str | None = None


Progress = Callable[[str], Awaitable[None]]
Handler = Callable[[Command, Progress], Awaitable[Outcome]]
Reply = Callable[[str, bytes, Properties], Awaitable[None]]


@dataclass
class CommandStats:
    received: int = 0
    by_code: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0


class CommandProcessor:
    def __init__(
        self,
        topics: AgentTopics,
        settings: CommandsSection,
        handlers: Mapping[str, Handler],
        reply: Reply,
        *,
        state_dir: Path | None = None,
        use_properties: bool = True,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._topics = topics
        self._handlers = dict(handlers)
        self._reply = reply
        self._use_properties = use_properties
        self._wall_ns = wall_ns
        self._state_dir = state_dir
        self._answers: collections.OrderedDict[str, Response] = collections.OrderedDict()
        self._running: set[str] = set()
        self._nonces = NonceCache()
        self.settings = settings
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.stats = CommandStats()
        self.reconfigure(settings)

    def reconfigure(self, settings: CommandsSection) -> None:
        """New trust settings (a committed config). Keys were validated with the config."""
        self.settings = settings
        self._keys = {k: load_public_key(v.encode()) for k, v in settings.trusted_keys.items()}

    # -- persistence -------------------------------------------------------------------------

    def load_state(self) -> None:
        """Read the persisted nonces and answers (blocking: call before the loop serves commands)."""
        if self._state_dir is None:
            return
        try:
            self._nonces = NonceCache.from_bytes((self._state_dir / "nonces.json").read_bytes())
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError) as exc:
            # Losing the cache reopens replays only within unexpired windows; say so loudly.
            log.error("commands: nonce cache unreadable (%s); starting empty", exc)
        try:
            raw = (self._state_dir / "answers.json").read_bytes()
            for resp in msgspec.json.decode(raw, type=list[Response]):
                self._answers[resp.id] = resp
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError) as exc:
            log.error("commands: stored answers unreadable (%s); starting empty", exc)

    async def _save(self, name: str, data: bytes) -> None:
        if self._state_dir is None:
            return
        state_dir = self._state_dir

        def write() -> None:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            write_atomic(state_dir / name, data, mode=0o640)

        await asyncio.to_thread(write)

    # -- serving -----------------------------------------------------------------------------

    def _route(self, msg: Publish, reply_to: str | None, correlation: str | None) -> Route:
        props = msg.properties
        if props.response_topic:
            if _publishable(props.response_topic, "Response Topic"):
                return Route(props.response_topic, props.correlation_data, correlation)
            # Unusable: the default reply topic, still with the requester's correlation data.
            return Route(self._topics.reply, props.correlation_data, correlation)
        if reply_to and _publishable(reply_to, "reply_to"):
            return Route(reply_to, None, correlation)
        return Route(self._topics.reply, None, correlation)  # valid: built from checked parts

    async def handle(self, msg: Publish) -> None:
        """Answer one received command message (see the module docstring); never raises but for cancel.

        Supervisor boundary: this runs as one task per received message in the agent's TaskGroup, so
        nothing a message carries may end it. An answer the link cannot carry (a reply topic the broker
        limits refuse, a payload over its Maximum Packet Size) is logged and dropped; the link closing
        under us drops the answer too (the operator retries; the stored answer is sent again then).
        """
        try:
            await self._handle(msg)
        except (LocalProtocolError, UplinkClosed) as exc:
            log.warning("commands: the answer to a message on %s was not sent: %s", msg.topic, exc)
        except Exception:  # supervisor boundary: a bug must cost one answer, not the agent
            log.exception("commands: handling a message on %s failed", msg.topic)

    async def _handle(self, msg: Publish) -> None:
        self.stats.received += 1
        try:
            cmd = decode_command(msg.payload)
        except CommandError as exc:
            cid, name, reply_to, correlation = peek_id(msg.payload)
            log.warning("commands: refused a message on %s: %s", msg.topic, exc.message)
            await self._answer(
                self._route(msg, reply_to, correlation),
                cid,
                name,
                Outcome(exc.code, exc.message),
                store=False,
            )
            return
        route = self._route(msg, cmd.reply_to, cmd.correlation)
        stored = self._answers.get(cmd.id)
        if stored is not None:
            self.stats.duplicates += 1
            log.info("commands: %s %s re-delivered; sending the stored answer", cmd.name, cmd.id)
            await self._send(route, msgspec.structs.replace(stored, correlation=route.correlation))
            return
        if cmd.id in self._running:
            self.stats.duplicates += 1
            log.info("commands: %s %s re-delivered while running; its answer will follow", cmd.name, cmd.id)
            return
        self._running.add(cmd.id)
        try:
            outcome = await self._authorize_and_run(cmd, route)
            await self._answer(route, cmd.id, cmd.name, outcome, store=outcome.code is not ResultCode.BUSY)
        finally:
            self._running.discard(cmd.id)
        if outcome.after is not None:
            outcome.after()

    async def _authorize_and_run(self, cmd: Command, route: Route) -> Outcome:
        try:
            await self._authorize(cmd)
        except CommandError as exc:
            log.warning("commands: %s %s refused: %s", cmd.name, cmd.id, exc.message)
            return Outcome(exc.code, exc.message)
        handler = self._handlers.get(cmd.name)
        if handler is None:
            return Outcome(ResultCode.UNSUPPORTED, f"{cmd.name} is not available on this agent")

        async def progress(note: str) -> None:
            # Advisory: never let a note (on a link that is being replaced) hold up the command itself.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROGRESS_TIMEOUT_S):
                    await self._send(
                        route,
                        self._response(
                            cmd.id,
                            cmd.name,
                            Outcome(ResultCode.PROGRESS, note),
                            final=False,
                            correlation=route.correlation,
                        ),
                    )

        log.info("commands: running %s %s", cmd.name, cmd.id)
        try:
            return await handler(cmd, progress)
        except CommandError as exc:
            return Outcome(exc.code, exc.message)
        except Exception as exc:  # supervisor boundary: one bad command must be answered, not kill the agent
            log.exception("commands: %s %s failed unexpectedly", cmd.name, cmd.id)
            return Outcome(ResultCode.FAILED, f"internal error: {type(exc).__name__}: {exc}")

    async def _authorize(self, cmd: Command) -> None:
        s = self.settings
        must_sign = cmd.is_control and s.require_signed_control
        if not must_sign and cmd.signature is None:
            return
        now_ns = self._wall_ns()
        verify_command(self._topics.agent_id, cmd, self._keys, now_ns=now_ns, max_validity_s=s.max_validity_s)
        assert cmd.nonce is not None and cmd.expires_at_ns is not None  # verify_command checked them
        self._nonces.check_and_add(cmd.nonce, cmd.expires_at_ns, now_ns)
        # Durable before the command runs: a restart right after must still refuse the replay.
        await self._save("nonces.json", self._nonces.to_bytes())

    def _response(
        self, cid: str, name: str, outcome: Outcome, *, final: bool = True, correlation: str | None = None
    ) -> Response:
        return Response(
            id=cid,
            name=name,
            code=outcome.code,
            message=outcome.message,
            agent=self._topics.agent_id,
            ts_ns=self._wall_ns(),
            final=final,
            result=outcome.result,
            correlation=correlation,
        )

    async def _answer(self, route: Route, cid: str, name: str, outcome: Outcome, *, store: bool) -> None:
        resp = self._response(cid, name, outcome, correlation=route.correlation)
        self.stats.by_code[outcome.code.value] = self.stats.by_code.get(outcome.code.value, 0) + 1
        if store and cid:
            self._answers[cid] = msgspec.structs.replace(resp, correlation=None)
            while len(self._answers) > self.settings.answers_kept:
                self._answers.popitem(last=False)
            await self._save("answers.json", msgspec.json.encode(list(self._answers.values())))
        log.info("commands: %s %s -> %s: %s", name or "?", cid or "?", outcome.code.value, outcome.message)
        await self._send(route, resp)

    async def _send(self, route: Route, resp: Response) -> None:
        props = NO_PROPERTIES
        if self._use_properties:
            props = Properties(
                content_type=CONTENT_TYPE_RESPONSE,
                payload_format_indicator=1,
                correlation_data=route.correlation_data,
            )
        await self._reply(route.topic, encode_json(resp), props)


def _publishable(topic: str, what: str) -> bool:
    """Whether an answer may be published to `topic` (from the request: validated, never trusted)."""
    try:
        validate_topic_name(topic)
    except TopicError as exc:
        log.warning("commands: %s %r is not a topic an answer can go to (%s); answering on the default "
                    "reply topic", what, topic[:200], exc)
        return False
    return True
