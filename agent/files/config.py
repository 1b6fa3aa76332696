"""The `[files]` config section: file-transfer tuning and the folders watched for files to upload."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

from uplink.schema.filetransfer import RetryPolicy

KIB = 1024


class WatchFolder(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One watched folder. Lower `priority` uploads sooner; `glob` matches the file name."""

    path: str
    file_class: str = "file"
    priority: int = 5
    glob: str = "*"
    recursive: bool = False
    after_upload: Literal["delete", "archive"] = "archive"
    archive_dir: str | None = None  # default: `<path>/.uploaded` (ignored by the watcher)
    stable_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must not be empty")
        if not 0 <= self.priority <= 9:
            raise ValueError("priority must be within 0..9")
        if not 0 < self.stable_s <= 3600:
            raise ValueError("stable_s must be within 0..3600 s (exclusive of 0)")
        if not self.file_class:
            raise ValueError("file_class must not be empty")

    def archive_path(self) -> Path:
        return Path(self.archive_dir) if self.archive_dir else Path(self.path) / ".uploaded"


class FilesSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The agent's `[files]` section: transfer tuning and the watched folders."""

    mode: Literal["async", "sync"] = "async"  # async: fin verdict by response message (needed at 3.1.1)
    # ~1000 KiB: one segment per PUBLISH under the broker's 1 MiB maximum packet size with room for
    # the topic and properties (measured over a QUIC data stream: 0.87x raw aioquic throughput at
    # 1000 KiB, 0.59x at 256 KiB). Clamped below any smaller limit the broker announces.
    segment_size_bytes: int = 1000 * KIB
    max_inflight_segments: int = 16
    max_attempts: int = 6
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    fin_response_timeout_s: float = 330.0
    segments_ttl_s: int | None = None
    folders: tuple[WatchFolder, ...] = ()
    # Where the `file.upload` command may take files from, besides the watched folders: a remote command
    # must not be able to read /etc/shadow. Paths are resolved (symlinks followed) before the check.
    upload_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for root in self.upload_roots:
            if not Path(root).is_absolute():
                raise ValueError(f"upload_roots: {root!r} must be an absolute path")
        if not 1 * KIB <= self.segment_size_bytes <= 64 * 1024 * KIB:
            raise ValueError("segment_size_bytes must be within 1 KiB..64 MiB")
        if not 1 <= self.max_inflight_segments <= 1024:
            raise ValueError("max_inflight_segments must be within 1..1024")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError("retry_initial_s must be > 0 and <= retry_max_s")
        if self.fin_response_timeout_s <= 0:
            raise ValueError("fin_response_timeout_s must be > 0")
        if self.segments_ttl_s is not None and self.segments_ttl_s < 1:
            raise ValueError("segments_ttl_s must be >= 1")

    def may_upload(self, path: Path) -> bool:
        """True when `path` (already resolved) lies under a watched folder or an upload root."""
        roots = [Path(f.path) for f in self.folders] + [Path(r) for r in self.upload_roots]
        return any(path.is_relative_to(root.resolve()) for root in roots)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts, initial_backoff_s=self.retry_initial_s,
                           max_backoff_s=self.retry_max_s, fin_response_timeout_s=self.fin_response_timeout_s)
