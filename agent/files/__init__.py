"""Sensor files to the cloud over MQTT file transfer: config, outbox, resumable uploader, folder watcher.

Modules: `config` (the `[files]` section), `outbox` (SQLite list of files and their progress), `uploader`
(one file at a time over the Uplink, resumable), `watcher` (folders -> outbox), `sendfile` (`edge-agent
send-file`), and `service` (the running agent's wiring: uploader + watcher tasks across link swaps, the
`file.upload` command, counters). `service` is not re-exported here: it imports `agent.commands`, which
imports `agent.config`, which imports this package for `FilesSection`.
"""

from __future__ import annotations

from agent.files.config import FilesSection, WatchFolder
from agent.files.outbox import FileOutbox, OutboxRow
from agent.files.sendfile import ProgressBar, send_file
from agent.files.uploader import FileChangedError, FileUploader, ProgressFn, UploadOutcome
from agent.files.watcher import FolderWatcher

__all__ = [
    "FileChangedError",
    "FileOutbox",
    "FileUploader",
    "FilesSection",
    "FolderWatcher",
    "OutboxRow",
    "ProgressBar",
    "ProgressFn",
    "UploadOutcome",
    "WatchFolder",
    "send_file",
]
