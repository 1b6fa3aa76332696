"""File transfer inside the agent: the watcher's files and `file.upload` reach our broker's file transfer,
with the fin verdict routed to the uploader by the agent's one inbound reader (async mode)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.config import parse_config
from agent.files.service import command_handlers
from tests.integration.test_filetransfer_broker import BrokerThread, broker  # noqa: F401 - fixture
from uplink.schema.commands import Command, CommandError, ResultCode

pytestmark = pytest.mark.integration
WAIT_S = 20.0


@contextlib.asynccontextmanager
async def running_agent(doc: dict[str, Any]) -> AsyncIterator[Agent]:
    agent = Agent(parse_config(doc))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(agent.run(), name="agent-under-test")
        try:
            async with asyncio.timeout(WAIT_S):
                await agent.link.wait_connected()
            yield agent
        finally:
            agent.stop()
            async with asyncio.timeout(WAIT_S):
                await asyncio.wait([task])


def doc(tmp_path: Path, port: int) -> dict[str, Any]:
    return {
        "agent": {"id": "files-1", "data_dir": str(tmp_path / "agent"), "drain_on_stop_s": 0.5},
        "uplink": {"host": "127.0.0.1", "port": port, "reconnect_initial_s": 0.05},
        "files": {
            "mode": "async",
            "segment_size_bytes": 4096,
            "folders": [{"path": str(tmp_path / "watch"), "file_class": "can-log", "stable_s": 0.2}],
            "upload_roots": [str(tmp_path / "manual")],
        },
    }


async def no_progress(note: str) -> None:
    pass


async def test_a_watched_file_and_a_file_upload_command_are_uploaded_over_the_agents_link(
    tmp_path: Path,
    broker: BrokerThread,  # noqa: F811 - the fixture
) -> None:
    (tmp_path / "watch").mkdir()
    (tmp_path / "manual").mkdir()
    watched = tmp_path / "watch" / "trip-1.blf"
    watched.write_bytes(bytes(range(256)) * 50)
    manual = tmp_path / "manual" / "diag.bin"
    manual.write_bytes(b"diagnostics" * 1000)
    async with running_agent(doc(tmp_path, broker.port)) as agent:
        upload = command_handlers(agent)["file.upload"]
        answer = await upload(
            Command(id="u1", name="file.upload", args={"path": str(manual), "wait": True, "wait_s": WAIT_S}),
            no_progress,
        )
        assert answer.code == ResultCode.OK, answer.message
        assert answer.result is not None
        exported = broker.export_dir("files-1", answer.result["file_id"]) / "diag.bin"
        assert exported.read_bytes() == manual.read_bytes()
        async with asyncio.timeout(WAIT_S):  # the watcher's upload has no event to await: look again
            for _ in range(int(WAIT_S / 0.05)):
                if agent.file_stats.get("uploaded", 0) >= 2:
                    break
                await asyncio.sleep(0.05)
        with pytest.raises(CommandError) as refused:
            await upload(Command(id="u2", name="file.upload", args={"path": "/etc/passwd"}), no_progress)
        assert refused.value.code == ResultCode.INVALID
    assert not watched.exists()
    assert (tmp_path / "watch" / ".uploaded" / "trip-1.blf").exists()
    assert agent.file_service is None  # stopped with the agent
