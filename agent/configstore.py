"""Persist pushed configs atomically in the data dir: pending (on trial), current (last-known-good), previous.

Theory of operation. /etc/edge-agent is read-only to the service (ProtectSystem=strict), so configs pushed
over MQTT live in `{data_dir}/config/`:

    pending.toml    written (temp + fsync + rename) before a new config is applied; exists only during
                    the trial (health gate). A crash or power cut in the trial leaves it behind: the next
                    start moves it to rejected.toml and runs current.toml, i.e. it rolls back.
    current.toml    the committed config (last-known-good); it wins over the base file at start.
    previous.toml   the config current.toml replaced, for the operator's reference.
    rejected.toml   the last config that failed (validation, gate, or an interrupted trial).

Every replacement is an atomic rename of a fully fsynced file, so each name always holds either the old or
the new complete document. Calls do blocking disk I/O: run them off the event loop (asyncio.to_thread).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig, ConfigError, parse_toml
from store_forward.atomic import fsync_dir, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredConfig:
    text: str
    config: AgentConfig


class ConfigStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir) / "config"
        self.pending = self.dir / "pending.toml"
        self.current = self.dir / "current.toml"
        self.previous = self.dir / "previous.toml"
        self.rejected = self.dir / "rejected.toml"

    def recover(self) -> str | None:
        """At start: a pending config means a trial was interrupted; reject it. Returns a note, or None."""
        if not self.pending.exists():
            return None
        self._rename(self.pending, self.rejected)
        note = "a config trial was interrupted (crash or power cut); rolled back to last-known-good"
        log.warning("config store: %s (kept as %s)", note, self.rejected)
        return note

    def load_committed(self) -> StoredConfig | None:
        """The committed pushed config, or None when there is none or it no longer validates."""
        try:
            text = self.current.read_text("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.error("config store: cannot read %s (%s); using the base config", self.current, exc)
            return None
        try:
            return StoredConfig(text, parse_toml(text, source=str(self.current)))
        except ConfigError as exc:
            # e.g. after a software update that changed the schema: the base file still starts the agent.
            log.error("config store: %s no longer validates (%s); using the base config", self.current, exc)
            return None

    def begin(self, text: str) -> None:
        """Persist a config about to be tried (before anything is applied)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        write_atomic(self.pending, text.encode("utf-8"), mode=0o640)

    def commit(self) -> None:
        """The trial passed: pending becomes current (last-known-good), the old current becomes previous."""
        # Copy, not move: current.toml must exist at every instant, or a power cut between the two steps
        # would leave no last-known-good. The rename of pending over current is the commit point.
        if self.current.exists():
            write_atomic(self.previous, self.current.read_bytes(), mode=0o640)
        self._rename(self.pending, self.current)

    def abandon(self) -> None:
        """The trial failed: keep the pending config as rejected.toml; current stays last-known-good."""
        if self.pending.exists():
            self._rename(self.pending, self.rejected)

    def reject(self, text: str) -> None:
        """Keep a config that never got to a trial (invalid) for the operator's reference."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        write_atomic(self.rejected, text.encode("utf-8"), mode=0o640)

    def _rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)
        fsync_dir(self.dir)
