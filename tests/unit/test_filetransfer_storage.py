"""The broker's file-transfer storage on a real temporary filesystem: fragments, assembly, export, GC."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cloud_broker.files.storage import FsStorage, export_hash
from uplink.schema.filetransfer import FileMeta, FileTransferError

DATA = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def storage(tmp_path: Path) -> FsStorage:
    return FsStorage(tmp_path / "segments", tmp_path / "exports", fsync=False)


def _store(storage: FsStorage, cid: str, fid: str, data: bytes, size: int) -> None:
    for offset in range(0, len(data), size):
        chunk = data[offset:offset + size]
        storage.store_segment(cid, fid, offset, chunk, hashlib.sha256(chunk).hexdigest())


def test_a_complete_transfer_is_exported_with_its_manifest_and_the_fragments_are_gone(
        storage: FsStorage, tmp_path: Path) -> None:
    storage.store_filemeta("dev1", "f1", FileMeta(name="card.csv", user_data={"class": "card"}))
    _store(storage, "dev1", "f1", DATA, 1000)
    exported = storage.assemble("dev1", "f1", len(DATA), hashlib.sha256(DATA).hexdigest())
    h = export_hash("dev1", "f1")
    assert exported.path == tmp_path / "exports" / h[:2] / h[2:4] / h[4:] / "dev1" / "f1" / "card.csv"
    assert exported.path.read_bytes() == DATA
    sidecar = json.loads(exported.path.with_name("card.csv.MANIFEST.json").read_text())
    assert sidecar == {"name": "card.csv", "user_data": {"class": "card"},
                       "checksum": hashlib.sha256(DATA).hexdigest()}
    assert not (tmp_path / "segments" / "dev1").exists()
    assert storage.find_export("dev1", "f1") == exported


def test_the_export_path_hash_is_erlang_term_to_binary_of_the_id_pair() -> None:
    # term_to_binary({<<"c">>, <<"f">>}) = 131,104,2,109,0,0,0,1,99,109,0,0,0,1,102
    term = bytes([131, 104, 2, 109, 0, 0, 0, 1, 99, 109, 0, 0, 0, 1, 102])
    assert export_hash("c", "f") == hashlib.sha1(term).hexdigest().upper()


def test_mixed_segment_sizes_assemble_when_an_exact_chain_exists(storage: FsStorage) -> None:
    storage.store_filemeta("c", "f", FileMeta(name="x"))
    _store(storage, "c", "f", DATA[:3000], 1000)  # 0-1000-2000-3000
    for offset in range(2000, len(DATA), 2000):  # a restarted client with bigger segments
        storage.store_segment("c", "f", offset, DATA[offset:offset + 2000], None)
    storage.store_segment("c", "f", 500, DATA[500:700], None)  # an overlapping stray
    assert storage.assemble("c", "f", len(DATA), None).path.read_bytes() == DATA


@pytest.mark.parametrize("drop", [0, 5000, 9000])
def test_a_gap_makes_fin_incomplete_and_keeps_the_fragments(storage: FsStorage, drop: int) -> None:
    storage.store_filemeta("c", "f", FileMeta(name="x"))
    for offset in range(0, len(DATA), 1000):
        if offset != drop:
            storage.store_segment("c", "f", offset, DATA[offset:offset + 1000], None)
    with pytest.raises(FileTransferError) as err:
        storage.assemble("c", "f", len(DATA), None)
    assert err.value.reason == "incomplete"
    storage.store_segment("c", "f", drop, DATA[drop:drop + 1000], None)
    assert storage.assemble("c", "f", len(DATA), None).size == len(DATA)


def test_fin_without_init_is_incomplete(storage: FsStorage) -> None:
    _store(storage, "c", "f", DATA, 4096)  # segments before init are accepted
    with pytest.raises(FileTransferError) as err:
        storage.assemble("c", "f", len(DATA), None)
    assert err.value.reason == "incomplete"


def test_a_segment_that_does_not_match_its_checksum_is_not_stored(storage: FsStorage, tmp_path: Path) -> None:
    with pytest.raises(FileTransferError) as err:
        storage.store_segment("c", "f", 0, b"tampered", hashlib.sha256(b"original").hexdigest())
    assert err.value.reason == "checksum_mismatch"
    assert not list((tmp_path / "segments").rglob("SEG.*"))


def test_a_wrong_file_checksum_fails_fin_and_the_right_one_then_succeeds(storage: FsStorage) -> None:
    storage.store_filemeta("c", "f", FileMeta(name="x"))
    _store(storage, "c", "f", DATA, 4096)
    with pytest.raises(FileTransferError) as err:
        storage.assemble("c", "f", len(DATA), "0" * 64)
    assert err.value.reason == "checksum_mismatch"
    assert storage.find_export("c", "f") is None
    assert storage.assemble("c", "f", len(DATA), hashlib.sha256(DATA).hexdigest()).size == len(DATA)


def test_the_init_checksum_is_checked_when_fin_carries_none(storage: FsStorage) -> None:
    storage.store_filemeta("c", "f", FileMeta(name="x", checksum="1" * 64))
    _store(storage, "c", "f", DATA, 4096)
    with pytest.raises(FileTransferError):
        storage.assemble("c", "f", len(DATA), None)


def test_identical_init_is_accepted_and_a_different_one_conflicts(storage: FsStorage) -> None:
    storage.store_filemeta("c", "f", FileMeta(name="x", size=3))
    storage.store_filemeta("c", "f", FileMeta(name="x", size=3))
    with pytest.raises(FileTransferError) as err:
        storage.store_filemeta("c", "f", FileMeta(name="x", size=4))
    assert err.value.reason == "filemeta_conflict"


@pytest.mark.parametrize(("cid", "fid"), [("..", "f"), ("c", ".."), ("../../x", "f"), ("c", "a/../../b"),
                                          ("c:\\x", "f\n")])
def test_hostile_ids_stay_inside_the_roots(storage: FsStorage, tmp_path: Path, cid: str, fid: str) -> None:
    storage.store_filemeta(cid, fid, FileMeta(name="n"))
    storage.store_segment(cid, fid, 0, b"abc", None)
    exported = storage.assemble(cid, fid, 3, None)
    roots = (tmp_path / "segments", tmp_path / "exports")
    assert all(any(p.is_relative_to(root) for root in roots) for p in tmp_path.rglob("*"))
    assert exported.path.is_relative_to(tmp_path / "exports")
    assert exported.path.read_bytes() == b"abc"


def test_an_id_too_long_for_the_filesystem_is_refused(storage: FsStorage) -> None:
    with pytest.raises(FileTransferError) as err:
        storage.store_segment("c", "/" * 100, 0, b"x", None)
    assert err.value.reason == "name_too_long"


def _age(path: Path, seconds: float) -> None:
    for p in [path, *path.rglob("*")]:
        st = p.stat()
        os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))


def test_gc_removes_idle_transfers_by_their_clamped_ttl_and_keeps_fresh_ones(
        storage: FsStorage, tmp_path: Path) -> None:
    import time

    storage.store_filemeta("c", "old", FileMeta(name="x", segments_ttl=60))  # clamped up to 300 s
    storage.store_segment("c", "old", 0, b"abc", None)
    storage.store_filemeta("c", "young", FileMeta(name="y"))  # default TTL: the max (3600 here)
    storage.store_segment("c", "young", 0, b"abc", None)
    storage.store_segment("c", "busy", 0, b"abc", None)
    _age(storage.transfer_dir("c", "old"), 200)
    _age(storage.transfer_dir("c", "young"), 1000)
    _age(storage.transfer_dir("c", "busy"), 10_000)
    now = time.time()
    first = storage.gc(now, 300, 3600, busy=frozenset({("c", "busy")}))
    assert first.transfers_removed == 0
    _age(storage.transfer_dir("c", "old"), 200)
    second = storage.gc(now, 300, 3600, busy=frozenset({("c", "busy")}))
    assert second.transfers_removed == 1
    assert not storage.transfer_dir("c", "old").exists()
    assert storage.transfer_dir("c", "young").exists() and storage.transfer_dir("c", "busy").exists()
    assert storage.gc(now, 300, 3600).transfers_removed == 1  # busy no more, and older than the max
