"""The durable file outbox (`<data_dir>/files.db`, SQLite): files to upload, their plans and acked segments.

A file enters it once (watcher, `file.upload` or `send-file`), with its class, priority and what to do
with it afterwards; the row then carries the upload plan (fileId, segment size, SHA-256, the exact init
JSON) and the acknowledged segment offsets, each committed as its PUBACK arrives, so an upload resumes
after a crash under the same fileId with only the missing segments (A13, A21). Also the blocking file
helpers the uploader runs on threads (hash, read a segment, dispose of an uploaded file).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from uplink.schema.filetransfer import UploadPlan

HASH_CHUNK_BYTES = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    file_class TEXT NOT NULL,
    priority INTEGER NOT NULL,
    owner TEXT NOT NULL,                 -- 'agent', or 'cli' for send-file
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    dispose TEXT NOT NULL,               -- keep | delete | archive
    archive_dir TEXT,
    state TEXT NOT NULL,                 -- queued | uploading | confirmed | done | failed
    file_id TEXT,
    mode TEXT,
    segment_size INTEGER,
    checksum TEXT,
    init_json BLOB,
    init_acked INTEGER NOT NULL DEFAULT 0,
    new_ids INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    enqueued_ns INTEGER NOT NULL,
    finished_ns INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS files_active ON files(path, size, mtime_ns)
    WHERE state IN ('queued', 'uploading', 'confirmed');
CREATE TABLE IF NOT EXISTS acked (
    file INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (file, offset)
) WITHOUT ROWID;
"""


_COLUMNS = ("id, path, name, file_class, priority, owner, size, mtime_ns, dispose, archive_dir, state, "
            "file_id, mode, segment_size, checksum, init_json, init_acked, new_ids, error")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    path: str
    name: str
    file_class: str
    priority: int
    owner: str
    size: int
    mtime_ns: int
    dispose: str
    archive_dir: str | None
    state: str
    file_id: str | None
    mode: str | None
    segment_size: int | None
    checksum: str | None
    init_json: bytes | None
    init_acked: bool
    new_ids: int
    error: str | None


class FileOutbox:
    """The durable list of files to upload and their progress. Blocking: call from one thread."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")  # the agent and `send-file` may share the file
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _row(self, where: str, args: Sequence[object]) -> OutboxRow | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE {where}", args)
        r = cur.fetchone()
        if r is None:
            return None
        return OutboxRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12],
                         r[13], r[14], r[15], bool(r[16]), r[17], r[18])

    def enqueue(self, path: Path, *, file_class: str, priority: int, owner: str, dispose: str,
                archive_dir: str | None, now_ns: int) -> int | None:
        """Add a file (as it is now: size, mtime); None if the same version is already queued."""
        st = path.stat()
        try:
            cur = self._db.execute(
                "INSERT INTO files (path, name, file_class, priority, owner, size, mtime_ns, dispose, "
                "archive_dir, state, enqueued_ns) VALUES (?,?,?,?,?,?,?,?,?, 'queued', ?)",
                (str(path), path.name, file_class, priority, owner, st.st_size, st.st_mtime_ns, dispose,
                 archive_dir, now_ns))
        except sqlite3.IntegrityError:
            return None
        return cur.lastrowid

    def find_active(self, path: Path) -> OutboxRow | None:
        st = path.stat()
        return self._row("path = ? AND size = ? AND mtime_ns = ? AND state IN ('queued','uploading',"
                         "'confirmed') ORDER BY id LIMIT 1", (str(path), st.st_size, st.st_mtime_ns))

    def get(self, row_id: int) -> OutboxRow | None:
        return self._row("id = ?", (row_id,))

    def next_for(self, owner: str) -> OutboxRow | None:
        """The next file to work on: confirmed ones (only disposal left) first, then by priority."""
        return self._row("owner = ? AND state IN ('queued','uploading','confirmed') ORDER BY "
                         "state != 'confirmed', priority, id LIMIT 1", (owner,))

    def start(self, row_id: int, plan: UploadPlan) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM acked WHERE file = ?", (row_id,))
            self._db.execute("UPDATE files SET state='uploading', file_id=?, mode=?, segment_size=?, "
                             "checksum=?, init_json=?, init_acked=0 WHERE id=?",
                             (plan.file_id, plan.mode.value, plan.segment_size, plan.checksum,
                              plan.init_payload, row_id))

    def acked_offsets(self, row_id: int) -> set[int]:
        return {o for (o,) in self._db.execute("SELECT offset FROM acked WHERE file = ?", (row_id,))}

    def ack_init(self, row_id: int) -> None:
        self._db.execute("UPDATE files SET init_acked = 1 WHERE id = ?", (row_id,))

    def ack_segment(self, row_id: int, offset: int) -> None:
        self._db.execute("INSERT OR IGNORE INTO acked (file, offset) VALUES (?, ?)", (row_id, offset))

    def forget_progress(self, row_id: int) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM acked WHERE file = ?", (row_id,))
            self._db.execute("UPDATE files SET init_acked = 0 WHERE id = ?", (row_id,))

    def new_file_id(self, row_id: int) -> None:
        """Start over: the next attempt gets a fresh fileId (never reuse one, A13/A20)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM acked WHERE file = ?", (row_id,))
            self._db.execute("UPDATE files SET file_id = NULL, init_acked = 0, new_ids = new_ids + 1, "
                             "state = 'queued' WHERE id = ?", (row_id,))

    def set_state(self, row_id: int, state: str, *, error: str | None = None,
                  now_ns: int | None = None) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE files SET state = ?, error = ?, finished_ns = ? WHERE id = ?",
                             (state, error, now_ns, row_id))
            if state in ("done", "failed"):
                self._db.execute("DELETE FROM acked WHERE file = ?", (row_id,))

    def rows(self) -> list[OutboxRow]:
        ids = [i for (i,) in self._db.execute("SELECT id FROM files ORDER BY id")]
        return [r for i in ids if (r := self.get(i)) is not None]


def sha256_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size
        while remaining > 0 and (chunk := f.read(min(HASH_CHUNK_BYTES, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def read_segment(path: Path, offset: int, length: int) -> tuple[bytes, str]:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return data, hashlib.sha256(data).hexdigest()


def dispose(row: OutboxRow) -> None:
    """Delete or archive an uploaded file; a missing file means a previous run already did it."""
    path = Path(row.path)
    if row.dispose == "delete":
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif row.dispose == "archive":
        folder = Path(row.archive_dir or path.parent / ".uploaded")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        n = 1
        while target.exists():  # keep earlier uploads of the same name
            target = folder / f"{path.stem}.{n}{path.suffix}"
            n += 1
        with contextlib.suppress(FileNotFoundError):
            shutil.move(path, target)
