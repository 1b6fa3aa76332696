"""System: the whole path as processes; a SIGKILLed agent loses no committed record."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
LINE = re.compile(
    r"^demo: wells=(?P<wells>\d+) cards=(?P<cards>\d+) records=(?P<records>\d+) delivered=(?P<delivered>\d+) "
    r"lost=(?P<lost>-?\d+) duplicates=(?P<dups>\d+) p50_ms=(?P<p50>[\d.]+) p99_ms=(?P<p99>[\d.]+)$",
    re.M,
)

pytestmark = pytest.mark.system


def _run_demo(tmp_path: Path, *extra: str) -> tuple[int, dict[str, float], str]:
    proc = subprocess.run(
        [
            str(BIN / "edge-hil"),
            "demo",
            "--wells",
            "4",
            "--card-interval-s",
            "2",
            "--workdir",
            str(tmp_path),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    out = proc.stdout + proc.stderr
    m = LINE.search(proc.stdout)
    assert m, f"no summary line in demo output:\n{out}\n--- agent log ---\n" + _tail(tmp_path / "agent.log")
    return proc.returncode, {k: float(v) for k, v in m.groupdict().items()}, out


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else "(none)"


@pytest.mark.timeout(150)
def test_an_agent_killed_with_sigkill_mid_run_loses_no_committed_record(tmp_path: Path) -> None:
    rc, r, out = _run_demo(tmp_path, "--duration", "9", "--kill-agent-at", "4")
    assert "SIGKILL agent" in out
    assert r["lost"] == 0, out
    assert r["records"] > 0 and r["cards"] > 0, out
    assert r["delivered"] == r["records"], out
    assert rc == 0, out
