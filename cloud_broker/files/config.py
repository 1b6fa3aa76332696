"""Typed, frozen configuration of the broker's file-transfer server (the `[file_transfer]` TOML section)."""

from __future__ import annotations

from pathlib import Path

import msgspec

GIB = 1 << 30


class FileTransferConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Defaults follow EMQX (`file_transfer.*`), including `enable = false`.

    Roots default to `<data_dir>/file_transfer/segments` and `<data_dir>/file_transfer/exports`.
    """

    enable: bool = False  # B20: off unless enabled; `$file/` is then plain MQTT (PUBACK 0x10)
    segments_root: str | None = None
    exports_root: str | None = None
    max_file_size_bytes: int = 16 * GIB
    max_segment_size_bytes: int = 1 << 20  # the broker's max packet size bounds segments anyway
    assemble_timeout_s: float = 300.0
    gc_interval_s: float = 3600.0
    min_segments_ttl_s: int = 300
    max_segments_ttl_s: int = 86400
    io_threads: int = 4
    fsync: bool = True  # a PUBACK means the segment is on disk; off only for throwaway test brokers

    def __post_init__(self) -> None:
        if self.max_file_size_bytes < 0:
            raise ValueError("max_file_size_bytes must be >= 0")
        if self.max_segment_size_bytes < 1:
            raise ValueError("max_segment_size_bytes must be >= 1")
        if not 0 < self.assemble_timeout_s <= 86400:
            raise ValueError("assemble_timeout_s must be within 0..86400 s (exclusive of 0)")
        if self.gc_interval_s <= 0:
            raise ValueError("gc_interval_s must be > 0")
        if not 0 < self.min_segments_ttl_s <= self.max_segments_ttl_s:
            raise ValueError("min_segments_ttl_s must be > 0 and <= max_segments_ttl_s")
        if not 1 <= self.io_threads <= 64:
            raise ValueError("io_threads must be within 1..64")

    def segments_dir(self, data_dir: str | Path) -> Path:
        if self.segments_root:
            return Path(self.segments_root)
        return Path(data_dir) / "file_transfer" / "segments"

    def exports_dir(self, data_dir: str | Path) -> Path:
        return Path(self.exports_root) if self.exports_root else Path(data_dir) / "file_transfer" / "exports"

    def segments_ttl_s(self, requested_s: int | None) -> int:
        """EMQX clamps the init's `segments_ttl` to [min, max]; absent means the max."""
        if requested_s is None:
            return self.max_segments_ttl_s
        return max(self.min_segments_ttl_s, min(self.max_segments_ttl_s, requested_s))
