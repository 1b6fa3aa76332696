"""The edge<->cloud topic scheme: one tree per agent, so ACLs can confine a device to its own tree.

    {prefix}/{agent_id}/data/{stream}   record batches (stream: telemetry, card, event, ...), QoS 1
    {prefix}/{agent_id}/status          retained birth/death message
    {prefix}/{agent_id}/cmd             commands to the agent (operator role only)
    {prefix}/{agent_id}/reply           default reply topic for MQTT 3.1.1 commands

The default prefix is "fg/v1"; the version level lets the cloud run two schemas side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "fg/v1"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def validate_agent_id(agent_id: str) -> None:
    """Agent ids become one topic level and a client id: no wildcards, slashes, spaces or '$'."""
    if not _ID_RE.match(agent_id):
        raise ValueError(
            f"agent id {agent_id!r} must be 1-128 characters of A-Z a-z 0-9 . _ : - "
            "and start with a letter or digit"
        )


@dataclass(frozen=True, slots=True)
class AgentTopics:
    agent_id: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_agent_id(self.agent_id)

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.agent_id}"

    def data(self, stream: str) -> str:
        return f"{self.root}/data/{stream}"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def command(self) -> str:
        return f"{self.root}/cmd"

    @property
    def reply(self) -> str:
        return f"{self.root}/reply"


def all_data_filter(prefix: str = DEFAULT_PREFIX) -> str:
    """Subscription filter for every agent's record batches."""
    return f"{prefix}/+/data/#"


def parse_data_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str] | None:
    """(agent_id, stream) of a data topic, or None when the topic is not one."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 3 or parts[1] != "data":
        return None
    return parts[0], parts[2]
