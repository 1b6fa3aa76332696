"""hil.bench.store runs end to end on a small load and ends with its one result line."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from hil.bench import store as bench


async def test_the_store_benchmark_ends_with_its_result_line_and_shows_its_spread(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    args = parser.parse_args(["--records", "3000", "--rounds", "2", "--appenders", "16", "--per-append", "4",
                              "--batch", "64", "--dir", str(tmp_path)])
    assert await bench.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = re.fullmatch(r"bench store: ingest_per_s=(\d+) raw_sqlite_per_s=(\d+) ratio=([\d.]+) "
                          r"drain_per_s=(\d+) write_amplification=([\d.]+)", lines[-1])
    assert result is not None, lines[-1]
    assert all(float(g) > 0 for g in result.groups())
    assert any(re.match(r"bench store: ratio median [\d.]+ \(min [\d.]+, max [\d.]+\) over 2 rounds", x)
               for x in lines)
    # Raw commits exactly --batch rows per transaction (3000 / 64 -> 47 fsyncs); ours never packs more.
    commits = re.search(r"commits per round ours (\d+) raw (\d+)", "\n".join(lines))
    assert commits is not None
    assert int(commits.group(2)) == 47 <= int(commits.group(1))
    assert os.listdir(tmp_path) == []  # the work directory is removed
