"""File transfer over MQTT against our broker on loopback: our uploader, raw commands, paho-mqtt (v5 and
3.1.1), GC, idempotent fin, hostile names, and the folder watcher."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from agent.files import FilesSection, FileUploader, FolderWatcher, WatchFolder
from cloud_broker.acl import Acl, default_rules
from cloud_broker.config import BrokerConfig, ListenerConfig
from cloud_broker.files.config import FileTransferConfig
from cloud_broker.files.server import FileTransferServer, HubLink, acl_rules
from cloud_broker.files.storage import export_hash
from cloud_broker.server import serve
from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.packets import MQTT_311
from uplink.schema.filetransfer import FileMeta, Mode, fin_topic, init_topic, segment_topic

pytestmark = pytest.mark.integration
WAIT_S = 10.0


class WallClock:
    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset_s


class BrokerThread:
    """Our broker with the file-transfer hook, on its own event loop in a thread (paho blocks)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.wall = WallClock()
        config = FileTransferConfig(enable=True, fsync=False, assemble_timeout_s=5.0)
        self.ft = FileTransferServer(config, data_dir, wall_clock=self.wall)
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="broker", daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT_S), "broker did not start"

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        config = BrokerConfig(listeners=(ListenerConfig(host="127.0.0.1", port=0),), allow_anonymous=True)
        server = await serve(config, authorizer=Acl((*acl_rules(), *default_rules())), hooks=(self.ft,))
        self.port = server.ports["tcp"][0]
        try:
            async with asyncio.TaskGroup() as tg:
                ft_task = tg.create_task(self.ft.run(HubLink(server.hub)), name="file-transfer")
                await self.ft.wait_started()
                self._ready.set()
                await self._stop.wait()
                ft_task.cancel()
        finally:
            await server.close()

    def gc(self) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.ft.collect_garbage(), self._loop).result(WAIT_S)

    def export_dir(self, cid: str, fid: str) -> Path:
        h = export_hash(cid, fid)
        return self.data_dir / "file_transfer" / "exports" / h[:2] / h[2:4] / h[4:] / cid / fid

    def segments_dir(self) -> Path:
        return self.data_dir / "file_transfer" / "segments"

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_S)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    rig = BrokerThread(tmp_path / "broker")
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
async def uplink(broker: BrokerThread) -> AsyncIterator[Uplink]:
    link = Uplink(UplinkConfig("127.0.0.1", broker.port, "dev1", reconnect_initial_s=0.05))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(link.run(), name="uplink")
        await link.wait_connected()
        yield link
        await link.close()
        task.cancel()


# -- our client ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_our_uploader_delivers_a_file_byte_identical_with_its_manifest(
        broker: BrokerThread, uplink: Uplink, tmp_path: Path, mode: str) -> None:
    data = os.urandom(3 * 65536 + 123)
    path = tmp_path / "sound.wav"
    path.write_bytes(data)
    seen: list[tuple[int, int]] = []
    uploader = FileUploader(uplink, tmp_path / "files.db", FilesSection(mode=mode, segment_size_bytes=65536),  # type: ignore[arg-type]
                            owner="cli", consume_inbound=True)
    try:
        outcome = await uploader.send(path, progress=lambda done, total: seen.append((done, total)))
    finally:
        await uploader.close()
    assert outcome.ok and outcome.file_id is not None
    exported = broker.export_dir("dev1", outcome.file_id) / "sound.wav"
    assert exported.read_bytes() == data
    sidecar = json.loads(exported.with_name("sound.wav.MANIFEST.json").read_text())
    assert sidecar["checksum"] == hashlib.sha256(data).hexdigest() and sidecar["size"] == len(data)
    assert seen[-1] == (len(data), len(data))
    assert not any(broker.segments_dir().rglob("SEG.*"))


async def test_a_corrupted_segment_is_refused_and_the_resent_one_completes_the_file(
        broker: BrokerThread, uplink: Uplink) -> None:
    fid, data = str(uuid.uuid4()), os.urandom(5000)
    good = hashlib.sha256(data).hexdigest()
    assert await uplink.publish(init_topic(Mode.SYNC, fid), FileMeta(name="a.bin").to_json()) == 0
    corrupted = bytearray(data)
    corrupted[100] ^= 0xFF
    assert await uplink.publish(segment_topic(Mode.SYNC, fid, 0, good), bytes(corrupted)) == 0x80
    assert await uplink.publish(fin_topic(Mode.SYNC, fid, len(data), good), b"") == 0x80  # incomplete
    assert await uplink.publish(segment_topic(Mode.SYNC, fid, 0, good), data) == 0
    assert await uplink.publish(fin_topic(Mode.SYNC, fid, len(data), good), b"") == 0
    assert (broker.export_dir("dev1", fid) / "a.bin").read_bytes() == data


async def test_fin_is_idempotent_after_the_export(broker: BrokerThread, uplink: Uplink) -> None:
    fid, data = str(uuid.uuid4()), b"x" * 1000
    await uplink.publish(init_topic(Mode.SYNC, fid), FileMeta(name="a").to_json())
    await uplink.publish(segment_topic(Mode.SYNC, fid, 0), data)
    codes = await asyncio.gather(*(uplink.publish(fin_topic(Mode.SYNC, fid, 1000), b"") for _ in range(3)))
    assert codes == [0, 0, 0]
    assert await uplink.publish(fin_topic(Mode.SYNC, fid, 1000), b"") == 0  # nothing left to assemble
    assert broker.ft.stats.files_exported == 1


async def test_qos0_commands_are_dropped_and_nothing_is_stored(broker: BrokerThread, uplink: Uplink) -> None:
    fid = str(uuid.uuid4())
    await uplink.publish(init_topic(Mode.SYNC, fid), FileMeta(name="a").to_json(), qos=0)
    await uplink.publish(segment_topic(Mode.SYNC, fid, 0), b"abc", qos=0)
    assert await uplink.publish(fin_topic(Mode.SYNC, fid, 3), b"") == 0x80  # never stored: incomplete
    assert broker.ft.stats.qos0_dropped == 2


async def test_abort_deletes_the_fragments(broker: BrokerThread, uplink: Uplink) -> None:
    fid = str(uuid.uuid4())
    await uplink.publish(segment_topic(Mode.SYNC, fid, 0), b"abc")
    assert any(broker.segments_dir().rglob("SEG.*"))
    assert await uplink.publish(f"$file/{fid}/abort", b"") == 0
    assert not any(broker.segments_dir().rglob("SEG.*"))


async def test_gc_removes_stale_fragments_but_not_fresh_ones(broker: BrokerThread, uplink: Uplink) -> None:
    stale, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    await uplink.publish(init_topic(Mode.SYNC, stale), FileMeta(name="a", segments_ttl=300).to_json())
    await uplink.publish(segment_topic(Mode.SYNC, stale, 0), b"abc")
    await uplink.publish(init_topic(Mode.SYNC, fresh), FileMeta(name="b").to_json())
    await uplink.publish(segment_topic(Mode.SYNC, fresh, 0), b"abc")
    broker.wall.offset_s = 301.0
    stats = await asyncio.to_thread(broker.gc)
    assert stats.transfers_removed == 1
    remaining = {p.name for p in (broker.segments_dir() / "dev1").iterdir()}
    assert remaining == {fresh}


# -- paho-mqtt, an independent client ---------------------------------------------------------


class Paho:
    def __init__(self, port: int, client_id: str, protocol: MQTTProtocolVersion) -> None:
        self.protocol = protocol
        self.acks: dict[int, int] = {}
        self.acked = threading.Condition()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(WAIT_S)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        with self.acked:
            self.acks[mid] = int(reason_code.value)
            self.acked.notify_all()

    def publish(self, topic: str, payload: bytes = b"", properties: PahoProperties | None = None) -> int:
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.acks, WAIT_S), f"no PUBACK for {topic}"
            return self.acks.pop(info.mid)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(WAIT_S)

    def response(self, topic: str) -> tuple[dict[str, Any], mqtt.MQTTMessage]:
        while True:
            msg = self.messages.get(timeout=WAIT_S)
            body = json.loads(msg.payload)
            if body["topic"] == topic:
                return body, msg

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("name", ["../../escape.txt", "a/b", "..", "C:evil", "bad\x00name", "new\nline",
                                  "x" * 241])
def test_paho_v5_gets_0x80_and_a_reason_for_a_malicious_file_name(broker: BrokerThread, name: str) -> None:
    peer = Paho(broker.port, "paho5", mqtt.MQTTv5)
    try:
        peer.subscribe("$file-response/paho5")
        topic = "$file/f1/init"
        assert peer.publish(topic, json.dumps({"name": name}).encode()) == 0x80
        body, _ = peer.response(topic)
        assert body["reason_code"] == 128 and body["reason_description"] == "invalid_filemeta"
        assert body["vsn"] == "0.1"
    finally:
        peer.close()
    assert not (broker.data_dir / "file_transfer" / "segments" / "paho5").exists()
    written = [p for p in broker.data_dir.parent.rglob("*") if "escape" in p.name or "evil" in p.name]
    assert written == []


def test_paho_v5_sync_transfer_answers_on_the_response_topic_with_correlation_data(
        broker: BrokerThread) -> None:
    peer = Paho(broker.port, "paho5s", mqtt.MQTTv5)
    data = os.urandom(3000)
    fid = str(uuid.uuid4())
    try:
        peer.subscribe("replies/paho5s")
        props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "replies/paho5s"
        props.CorrelationData = b"req-1"
        assert peer.publish(f"$file/{fid}/init", FileMeta(name="p.bin").to_json(), props) == 0
        body, msg = peer.response(f"$file/{fid}/init")
        assert body["reason_code"] == 0 and body["reason_description"] == "success"
        assert getattr(msg.properties, "CorrelationData", None) == b"req-1"
        for offset in range(0, 3000, 1000):
            chunk = data[offset:offset + 1000]
            assert peer.publish(f"$file/{fid}/{offset}/{hashlib.sha256(chunk).hexdigest()}", chunk) == 0
        assert peer.publish(f"$file/{fid}/fin/3000/{hashlib.sha256(data).hexdigest()}") == 0
    finally:
        peer.close()
    assert (broker.export_dir("paho5s", fid) / "p.bin").read_bytes() == data


def test_paho_v311_async_mode_learns_fin_results_from_responses(broker: BrokerThread) -> None:
    peer = Paho(broker.port, "paho3", mqtt.MQTTv311)
    data = os.urandom(2500)
    fid = str(uuid.uuid4())
    try:
        peer.subscribe("$file-response/paho3")
        peer.publish(f"$file-async/{fid}/init", FileMeta(name="q.bin").to_json())
        peer.publish(f"$file-async/{fid}/0", data[:1000])
        early = f"$file-async/{fid}/fin/2500"
        peer.publish(early)
        body, _ = peer.response(early)
        assert (body["reason_code"], body["reason_description"]) == (128, "incomplete")
        peer.publish(f"$file-async/{fid}/1000", data[1000:])
        fin = f"$file-async/{fid}/fin/2500/{hashlib.sha256(data).hexdigest()}"
        peer.publish(fin)
        body, _ = peer.response(fin)
        assert body["reason_code"] == 0
    finally:
        peer.close()
    assert (broker.export_dir("paho3", fid) / "q.bin").read_bytes() == data


def test_file_commands_are_never_routed_to_subscribers(broker: BrokerThread) -> None:
    watcher = Paho(broker.port, "nosy", mqtt.MQTTv5)
    sender = Paho(broker.port, "sender", mqtt.MQTTv5)
    try:
        watcher.client.subscribe("$file/#", qos=1)
        sender.publish("$file/f9/0", b"secret")
        with pytest.raises(queue.Empty):
            watcher.messages.get(timeout=0.3)
    finally:
        watcher.close()
        sender.close()


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# -- the folder watcher -----------------------------------------------------------------------


async def test_the_watcher_uploads_a_new_file_and_archives_it_after_the_cloud_confirmed(
        broker: BrokerThread, uplink: Uplink, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    folder = WatchFolder(path=str(inbox), file_class="image", glob="*.jpg", stable_s=0.2)
    uploader = FileUploader(uplink, tmp_path / "files.db", FilesSection(folders=(folder,)),
                            consume_inbound=True)

    async def enqueue(path: Path, wf: WatchFolder) -> None:
        await uploader.enqueue(path, file_class=wf.file_class, priority=wf.priority, dispose=wf.after_upload,
                               archive_dir=str(wf.archive_path()))

    watcher = FolderWatcher((folder,), enqueue)
    inbox.mkdir()
    (inbox / "ignored.txt").write_bytes(b"not an image")
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(watcher.run(), name="watcher"),
                     tg.create_task(uploader.run(), name="uploader")]
            data = os.urandom(100_000)
            # Written in two steps with a pause: only the whole file may go.
            target = inbox / "cam1.jpg"
            await asyncio.to_thread(target.write_bytes, data[:50_000])
            await asyncio.sleep(0.05)
            await asyncio.to_thread(_append, target, data[50_000:])
            archived = inbox / ".uploaded" / "cam1.jpg"
            async with asyncio.timeout(WAIT_S):
                while not archived.exists():  # noqa: ASYNC110 - a file appearing is not an event we own
                    await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
    finally:
        await uploader.close()
    assert archived.read_bytes() == data
    assert not (inbox / "cam1.jpg").exists() and (inbox / "ignored.txt").exists()
    exports = list((broker.data_dir / "file_transfer" / "exports").rglob("cam1.jpg"))
    assert len(exports) == 1 and exports[0].read_bytes() == data
    sidecar = json.loads(exports[0].with_name("cam1.jpg.MANIFEST.json").read_text())
    assert sidecar["user_data"] == {"class": "image"}


async def test_the_uploader_works_at_mqtt_311_in_async_mode(broker: BrokerThread, tmp_path: Path) -> None:
    link = Uplink(UplinkConfig("127.0.0.1", broker.port, "dev311", protocol_level=MQTT_311))
    data = os.urandom(70_000)
    (tmp_path / "log.txt").write_bytes(data)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(link.run(), name="uplink")
        uploader = FileUploader(link, tmp_path / "files.db", FilesSection(segment_size_bytes=16384),
                                consume_inbound=True)
        try:
            outcome = await uploader.send(tmp_path / "log.txt")
        finally:
            await uploader.close()
            await link.close()
            task.cancel()
    assert outcome.ok and outcome.file_id is not None
    assert (broker.export_dir("dev311", outcome.file_id) / "log.txt").read_bytes() == data
