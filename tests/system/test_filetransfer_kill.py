"""A 100 MB upload whose uploader process is SIGKILLed midway resumes under the same fileId, sending only
the segments the broker had not yet acknowledged, and arrives byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_broker.files.storage import export_hash
from hil.net import free_port, wait_tcp_listening

pytestmark = pytest.mark.system

SIZE_BYTES = 100 * 1024 * 1024
SEGMENT_BYTES = 256 * 1024
HELPER = [sys.executable, "-m", "tests.system._filetransfer_procs"]
ROOT = Path(__file__).resolve().parents[2]


def _acked(db: Path) -> tuple[str | None, int]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT file_id, (SELECT count(*) FROM acked) FROM files").fetchone()
    except sqlite3.OperationalError:
        return None, 0  # not created yet
    return (row[0], row[1]) if row else (None, 0)


def test_a_killed_upload_resumes_with_the_same_file_id_and_only_the_missing_segments(tmp_path: Path) -> None:
    port = free_port()
    broker = subprocess.Popen([*HELPER, "broker", str(tmp_path / "broker"), str(port)], cwd=ROOT,
                              stderr=subprocess.PIPE)
    try:
        wait_tcp_listening(port, pid=broker.pid)
        data_path = tmp_path / "capture.bin"
        digest = hashlib.sha256()
        with open(data_path, "wb") as f:
            for _ in range(SIZE_BYTES // (4 << 20)):
                chunk = os.urandom(4 << 20)
                digest.update(chunk)
                f.write(chunk)
        db = tmp_path / "files.db"
        total_segments = SIZE_BYTES // SEGMENT_BYTES

        first = subprocess.Popen([*HELPER, "send", str(port), str(db), str(data_path)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _acked(db)[1] < total_segments // 3:
            assert first.poll() is None, f"the uploader ended early: {first.communicate()}"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
        file_id, acked_before = _acked(db)
        assert file_id is not None and 0 < acked_before < total_segments

        second = subprocess.run([*HELPER, "send", str(port), str(db), str(data_path)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        result = json.loads(second.stdout.strip().splitlines()[-1])
        assert result["ok"] and result["file_id"] == file_id
        # Only the segments whose acknowledgement was not recorded went again.
        assert result["segments_sent"] == total_segments - acked_before

        h = export_hash("dev-kill", file_id)
        exported = tmp_path / "broker" / "file_transfer" / "exports" / h[:2] / h[2:4] / h[4:] / "dev-kill" / \
            file_id / "capture.bin"
        assert exported.stat().st_size == SIZE_BYTES
        got = hashlib.sha256()
        with open(exported, "rb") as f:
            while chunk := f.read(4 << 20):
                got.update(chunk)
        assert got.hexdigest() == digest.hexdigest()
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.communicate()
