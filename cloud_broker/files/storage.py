"""Durable file-transfer storage on the local filesystem: fragments, assembly, the local exporter, GC.

Blocking by design: the server calls it from its I/O threads, never from the event loop.

Layout (EMQX `emqx_ft_storage_fs` and `emqx_ft_storage_exporter_fs`):

    <segments>/<esc(clientId)>/<esc(fileId)>/frags/MANIFEST.json     ["filemeta", 1, {meta}]
    <segments>/<esc(clientId)>/<esc(fileId)>/frags/SEG.<offset>.<size>
    <segments>/<esc(clientId)>/<esc(fileId)>/tmp/                     atomic-write temp files
    <exports>/<H[0:2]>/<H[2:4]>/<H[4:]>/<esc(clientId)>/<esc(fileId)>/<name>
    <exports>/<H[0:2]>/<H[2:4]>/<H[4:]>/<esc(clientId)>/<esc(fileId)>/<name>.MANIFEST.json
    <exports>/tmp/                                                    assembly in progress

Invariants: every file appears under its final name only complete (write to tmp, fsync, rename,
fsync the directory), so a crash leaves either the old state or the new one. A transfer counts as
exported once its `<name>.MANIFEST.json` sidecar exists; the sidecar is renamed into place after the
file, so a sidecar always vouches for a complete, verified file. Every path is built from escaped ids
and a validated name, and checked to stay below its root before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import struct
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from uplink.schema.filetransfer import (
    FileMeta,
    FileTransferError,
    escape_path_component,
    filename_problem,
    parse_filemeta,
)

NAME_MAX_BYTES = 255  # filesystem limit on one path component
READ_CHUNK_BYTES = 1 << 20
MANIFEST = "MANIFEST.json"
EXPORT_MANIFEST_SUFFIX = ".MANIFEST.json"


def export_hash(client_id: str, file_id: str) -> str:
    """Uppercase hex SHA-1 of Erlang `term_to_binary({ClientId, FileId})` (both binaries), as EMQX does."""
    cid, fid = client_id.encode("utf-8", "surrogatepass"), file_id.encode("utf-8", "surrogatepass")
    term = b"\x83h\x02m" + struct.pack(">I", len(cid)) + cid + b"m" + struct.pack(">I", len(fid)) + fid
    return hashlib.sha1(term, usedforsecurity=False).hexdigest().upper()


def _component(value: str, what: str) -> str:
    escaped = escape_path_component(value)
    if len(escaped.encode()) > NAME_MAX_BYTES:
        raise FileTransferError("name_too_long", f"{what} is too long once escaped for the filesystem")
    return escaped


def _unescape(component: str) -> str:
    return urllib.parse.unquote_to_bytes(component).decode("utf-8", "surrogatepass")


def _inside(root: Path, path: Path) -> Path:
    """path, after checking that it stays strictly below root (no `..`, no absolute jump)."""
    normal = os.path.normpath(path)
    base = os.path.normpath(root)
    if os.path.commonpath([normal, base]) != base or normal == base:
        raise FileTransferError("unsafe_path", f"{path} would leave {root}")
    return Path(normal)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Exported:
    path: Path
    checksum: str  # SHA-256, lowercase hex
    size: int


@dataclass(frozen=True, slots=True)
class GcStats:
    transfers_removed: int = 0
    files_removed: int = 0


class FsStorage:
    """Fragments and exports under two roots. Safe to call from several threads for different
    transfers; the server runs at most one assembly per transfer."""

    def __init__(self, segments_root: Path, exports_root: Path, *, fsync: bool = True) -> None:
        self.segments_root = Path(os.path.abspath(segments_root))
        self.exports_root = Path(os.path.abspath(exports_root))
        self._fsync = fsync

    # -- paths ----------------------------------------------------------------------------------

    def transfer_dir(self, client_id: str, file_id: str) -> Path:
        cid, fid = _component(client_id, "client id"), _component(file_id, "file id")
        return _inside(self.segments_root, self.segments_root / cid / fid)

    def export_dir(self, client_id: str, file_id: str) -> Path:
        h = export_hash(client_id, file_id)
        cid, fid = _component(client_id, "client id"), _component(file_id, "file id")
        return _inside(self.exports_root, self.exports_root / h[0:2] / h[2:4] / h[4:] / cid / fid)

    # -- atomic writes --------------------------------------------------------------------------

    def _write_atomic(self, tmp_dir: Path, target: Path, data: bytes) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f".{target.name}.{secrets.token_hex(6)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self._fsync:
            _fsync_dir(target.parent)

    # -- commands -------------------------------------------------------------------------------

    def read_filemeta(self, client_id: str, file_id: str) -> FileMeta | None:
        path = self.transfer_dir(client_id, file_id) / "frags" / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        tag = json.loads(raw)
        if not (isinstance(tag, list) and len(tag) == 3 and tag[0] == "filemeta"):
            raise FileTransferError("invalid_filemeta", f"unreadable manifest {path}")
        return parse_filemeta(json.dumps(tag[2]).encode())

    def store_filemeta(self, client_id: str, file_id: str, meta: FileMeta) -> None:
        """Persist meta; identical meta refreshes its mtime (the GC clock), a different one conflicts."""
        base = self.transfer_dir(client_id, file_id)
        existing = self.read_filemeta(client_id, file_id)
        target = base / "frags" / MANIFEST
        if existing is not None:
            if existing != meta:
                raise FileTransferError("filemeta_conflict", "a different init was stored for this file id")
            os.utime(target)
            return
        doc = json.dumps(["filemeta", 1, meta.to_dict()], ensure_ascii=False).encode()
        self._write_atomic(base / "tmp", target, doc)

    def store_segment(self, client_id: str, file_id: str, offset: int, data: bytes,
                      checksum: str | None) -> None:
        """Verify (when a checksum came with it) and store one segment as `SEG.<offset>.<size>`."""
        if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
            raise FileTransferError("checksum_mismatch", f"segment at {offset} does not match its SHA-256")
        base = self.transfer_dir(client_id, file_id)
        self._write_atomic(base / "tmp", base / "frags" / f"SEG.{offset}.{len(data)}", data)

    def discard(self, client_id: str, file_id: str) -> None:
        """Delete every fragment of a transfer (after export, on abort, by GC)."""
        base = self.transfer_dir(client_id, file_id)
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.suppress(OSError):
            base.parent.rmdir()  # the client's directory, if this was its last transfer

    def find_export(self, client_id: str, file_id: str) -> Exported | None:
        """The export of this transfer, if one completed (its sidecar exists)."""
        folder = self.export_dir(client_id, file_id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return None
        for entry in names:
            if entry.endswith(EXPORT_MANIFEST_SUFFIX):
                sidecar = json.loads((folder / entry).read_bytes())
                path = folder / entry[: -len(EXPORT_MANIFEST_SUFFIX)]
                return Exported(path, str(sidecar.get("checksum", "")), path.stat().st_size)
        return None

    # -- assembly -------------------------------------------------------------------------------

    def _segments(self, client_id: str, file_id: str) -> dict[int, list[tuple[int, Path]]]:
        frags = self.transfer_dir(client_id, file_id) / "frags"
        by_start: dict[int, list[tuple[int, Path]]] = {}
        try:
            names = os.listdir(frags)
        except FileNotFoundError:
            return by_start
        for entry in names:
            parts = entry.split(".")
            if len(parts) != 3 or parts[0] != "SEG" or not (parts[1].isdigit() and parts[2].isdigit()):
                continue
            start, size = int(parts[1]), int(parts[2])
            if size > 0:  # zero-length segments are kept but never cover anything
                by_start.setdefault(start, []).append((start + size, frags / entry))
        return by_start

    @staticmethod
    def _chain(by_start: dict[int, list[tuple[int, Path]]], size: int) -> list[Path] | None:
        """Fewest segments chaining exactly from 0 to size (breadth-first over offsets), or None."""
        if size == 0:
            return []
        previous: dict[int, tuple[int, Path]] = {}
        queue = deque([0])
        seen = {0}
        while queue:
            start = queue.popleft()
            for end, path in sorted(by_start.get(start, ()), reverse=True):
                if end > size or end in seen:
                    continue
                seen.add(end)
                previous[end] = (start, path)
                if end == size:
                    chain: list[Path] = []
                    at = size
                    while at:
                        at, seg = previous[at]
                        chain.append(seg)
                    return chain[::-1]
                queue.append(end)
        return None

    def assemble(self, client_id: str, file_id: str, size: int, checksum: str | None) -> Exported:
        """Stream the segments into the exporter, verify SHA-256, publish file + sidecar, drop fragments.

        `checksum` (from fin) wins over the init's; with neither, the computed one is recorded.
        Raises FileTransferError: `incomplete` (no meta, gap, overrun), `checksum_mismatch`.
        """
        meta = self.read_filemeta(client_id, file_id)
        if meta is None:
            raise FileTransferError("incomplete", "missing filemeta (no init stored)")
        problem = filename_problem(meta.name)
        if problem is not None:  # stored by an older version or by hand: never trust it for a path
            raise FileTransferError("invalid_filemeta", f"name: {problem}")
        chain = self._chain(self._segments(client_id, file_id), size)
        if chain is None:
            raise FileTransferError("incomplete", f"segments do not cover [0, {size}) exactly")
        folder = self.export_dir(client_id, file_id)
        target = _inside(folder, folder / meta.name)
        sidecar = _inside(folder, folder / (meta.name + EXPORT_MANIFEST_SUFFIX))
        if len(sidecar.name.encode()) > NAME_MAX_BYTES:
            raise FileTransferError("name_too_long", "the export sidecar name exceeds the filesystem limit")
        tmp_dir = self.exports_root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{export_hash(client_id, file_id)}.{secrets.token_hex(6)}"
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for seg in chain:
                    with open(seg, "rb") as src:
                        while chunk := src.read(READ_CHUNK_BYTES):
                            digest.update(chunk)
                            out.write(chunk)
                if self._fsync:
                    out.flush()
                    os.fsync(out.fileno())
            computed = digest.hexdigest()
            expected = checksum or meta.checksum
            if expected is not None and expected.lower() != computed:
                raise FileTransferError("checksum_mismatch", "the assembled file does not match its SHA-256")
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        record = {**meta.to_dict(), "checksum": computed}
        self._write_atomic(tmp_dir, sidecar, json.dumps(record, ensure_ascii=False).encode())
        self.discard(client_id, file_id)
        return Exported(target, computed, size)

    # -- garbage collection ---------------------------------------------------------------------

    def gc(self, now_s: float, min_ttl_s: int, max_ttl_s: int,
           busy: frozenset[tuple[str, str]] = frozenset()) -> GcStats:
        """Delete fragments of transfers idle (newest mtime) longer than their clamped TTL, and of
        transfers already exported. `busy` (client id, file id) pairs are being assembled: skipped."""
        removed = files = 0
        try:
            clients = os.listdir(self.segments_root)
        except FileNotFoundError:
            clients = []
        for cid_dir in clients:
            client_path = self.segments_root / cid_dir
            if not client_path.is_dir():
                continue
            for fid_dir in os.listdir(client_path):
                client_id, file_id = _unescape(cid_dir), _unescape(fid_dir)
                if (client_id, file_id) in busy:
                    continue
                base = client_path / fid_dir
                newest = base.stat().st_mtime
                count = 0
                for sub in ("frags", "tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        for entry in os.scandir(base / sub):
                            count += 1
                            newest = max(newest, entry.stat().st_mtime)
                try:
                    meta = self.read_filemeta(client_id, file_id)
                except (FileTransferError, ValueError):
                    meta = None  # an unreadable manifest gets the default TTL
                requested = meta.segments_ttl if meta is not None else None
                ttl = max_ttl_s if requested is None else max(min_ttl_s, min(max_ttl_s, requested))
                exported = self.find_export(client_id, file_id) is not None
                if exported or now_s - newest > ttl:
                    shutil.rmtree(base, ignore_errors=True)
                    removed += 1
                    files += count
            with contextlib.suppress(OSError):
                client_path.rmdir()  # only succeeds when empty
        tmp_dir = self.exports_root / "tmp"
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(tmp_dir):
                if now_s - entry.stat().st_mtime > max_ttl_s:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        files += 1
        return GcStats(removed, files)
