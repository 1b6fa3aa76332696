"""`serve()` builds and runs the file-transfer server from `[file_transfer]`, owns its task, and stops the
broker when a component it owns dies."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import pytest

from cloud_broker.config import BrokerConfig, ListenerConfig, SysSection
from cloud_broker.files.config import FileTransferConfig
from cloud_broker.server import serve
from uplink.client import Uplink, UplinkConfig
from uplink.schema.filetransfer import FileMeta, Mode, fin_topic, init_topic, segment_topic

pytestmark = pytest.mark.integration
STEP_S = 10.0


def config(data_dir: Path, **file_transfer: object) -> BrokerConfig:
    return BrokerConfig(listeners=(ListenerConfig(host="127.0.0.1", port=0),), allow_anonymous=True,
                        data_dir=str(data_dir), sys=SysSection(interval_s=0),
                        file_transfer=FileTransferConfig(**file_transfer))  # type: ignore[arg-type]


async def test_an_enabled_file_transfer_section_is_served_with_the_default_acl(tmp_path: Path) -> None:
    server = await serve(config(tmp_path, enable=True, fsync=False))
    try:
        assert server.files is not None
        link = Uplink(UplinkConfig("127.0.0.1", server.ports["tcp"][0], "well-9"))
        fid, data = str(uuid.uuid4()), b"dynacard" * 100
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run(), name="uplink")
            async with asyncio.timeout(STEP_S):
                await link.wait_connected()
                assert await link.publish(init_topic(Mode.SYNC, fid), FileMeta(name="c.bin").to_json()) == 0
                assert await link.publish(segment_topic(Mode.SYNC, fid, 0), data) == 0
                digest = hashlib.sha256(data).hexdigest()
                assert await link.publish(fin_topic(Mode.SYNC, fid, len(data), digest), b"") == 0
            await link.close()
        assert server.files.stats.files_exported == 1
        exported = list((tmp_path / "file_transfer" / "exports").rglob("c.bin"))
        assert [p.read_bytes() for p in exported] == [data]
    finally:
        await server.close()
    assert server._components is not None and server._components.done()
    assert not server.hub.failed.is_set()


async def test_without_the_section_file_commands_are_plain_mqtt_refused_by_the_acl(tmp_path: Path) -> None:
    server = await serve(config(tmp_path))
    try:
        assert server.files is None and server._components is None
        link = Uplink(UplinkConfig("127.0.0.1", server.ports["tcp"][0], "well-9"))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run(), name="uplink")
            async with asyncio.timeout(STEP_S):
                await link.wait_connected()
                assert await link.publish(init_topic(Mode.SYNC, "f"), FileMeta(name="c").to_json()) == 0x87
            await link.close()
    finally:
        await server.close()


async def test_a_component_that_dies_stops_the_broker_through_hub_failed(tmp_path: Path) -> None:
    server = await serve(config(tmp_path))

    async def broken() -> None:
        await asyncio.sleep(0)
        raise OSError(28, "No space left on device")

    try:
        server._start_components([("broker-test-component", broken())])
        async with asyncio.timeout(STEP_S):
            await server.hub.failed.wait()
        assert server.hub.failed_what == "broker-test-component failed"
        assert isinstance(server.hub.failure, OSError)
    finally:
        await server.close()
