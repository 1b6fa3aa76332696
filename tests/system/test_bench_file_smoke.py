"""hil.bench.file runs end to end on a small file: broker and raw sink processes, one result line."""

from __future__ import annotations

import argparse
import re

import pytest

from hil.bench import file as bench

pytestmark = pytest.mark.system


async def test_the_file_benchmark_uploads_through_file_transfer_and_prints_its_ratio_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    args = parser.parse_args(["--size-mb", "3", "--rounds", "1", "--no-fsync", "--timeout-s", "60"])
    assert await bench.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = re.fullmatch(r"bench file: size_mb=3 ours_mb_s=([\d.]+) raw_quic_mb_s=([\d.]+) ratio=([\d.]+) "
                          r"raw_batched_mb_s=([\d.]+) ratio_same_io=([\d.]+) "
                          r"segment_kib=1000 window=16 fsync=false", lines[-1])
    assert result is not None, lines[-1]
    assert all(float(g) > 0 for g in result.groups())
    assert re.fullmatch(r"bench file: round=1 ours_s=[\d.]+ raw_quic_s=[\d.]+ raw_batched_s=[\d.]+ "
                        r"ratio=[\d.]+ ratio_same_io=[\d.]+", lines[0])
