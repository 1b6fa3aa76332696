"""Shared test fixtures: service discovery that fails (not skips) under CI=true."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """Path of an external program a test needs; missing -> skip locally, fail in CI."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        msg = f"{name} is not installed (./run setup installs it)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path
