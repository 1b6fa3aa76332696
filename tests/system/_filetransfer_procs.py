"""Processes for the file-transfer kill test: `broker DATA_DIR PORT`, or `send PORT DB FILE` (JSON result)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agent.files import FilesSection, FileUploader
from cloud_broker.acl import Acl, default_rules
from cloud_broker.config import BrokerConfig, ListenerConfig
from cloud_broker.files.config import FileTransferConfig
from cloud_broker.files.server import FileTransferServer, HubLink, acl_rules
from cloud_broker.server import serve
from uplink.client import Uplink, UplinkConfig


async def broker(data_dir: Path, port: int) -> None:
    ft = FileTransferServer(FileTransferConfig(enable=True, fsync=False), data_dir)
    config = BrokerConfig(listeners=(ListenerConfig(host="127.0.0.1", port=port),), allow_anonymous=True)
    server = await serve(config, authorizer=Acl((*acl_rules(), *default_rules())), hooks=(ft,))
    try:
        await ft.run(HubLink(server.hub))
    finally:
        await server.close()


async def send(port: int, db: Path, path: Path) -> None:
    link = Uplink(UplinkConfig("127.0.0.1", port, "dev-kill"))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(link.run(), name="uplink")
        # 256 KiB as the test counts segments (SEGMENT_BYTES), whatever the [files] default is.
        uploader = FileUploader(link, db, FilesSection(segment_size_bytes=256 * 1024), owner="cli",
                                consume_inbound=True)
        try:
            outcome = await uploader.send(path)
        finally:
            await uploader.close()
            await link.close()
            task.cancel()
    print(json.dumps({"ok": outcome.ok, "file_id": outcome.file_id, "error": outcome.error,
                      "segments_sent": uploader.segments_sent}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "broker":
        asyncio.run(broker(Path(sys.argv[2]), int(sys.argv[3])))
    else:
        asyncio.run(send(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))
