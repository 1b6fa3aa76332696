"""Smoke test: the card and fleet benchmarks run end to end with tiny parameters and print their line."""

from __future__ import annotations

import argparse

import pytest

from hil.bench import cli
from tests.conftest import require_binary

pytestmark = pytest.mark.integration


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edge-hil")
    cli.add_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["bench", *argv])


async def test_the_card_bench_reports_requests_at_the_minimum(capsys):
    require_binary("socat")
    args = parse("card", "--cards", "1", "--baud", "115200", "--n-points", "50")
    assert await args.main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in line.removeprefix("bench card: ").split())
    assert line.startswith("bench card: ") and fields["requests"] == fields["minimum"]


async def test_the_fleet_bench_commits_every_value_it_acquires(capsys):
    args = parse("fleet", "--wells", "3", "--duration-s", "2", "--speedup", "600", "--stress-wells", "2",
                 "--stress-duration-s", "2")
    assert await args.main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in line.removeprefix("bench fleet: ").split())
    assert fields["lost"] == "0" and fields["stress_lost"] == "0"
    assert int(fields["values"]) > 0
    # the bare client ran beside the agent on the same kind of traffic, and the ratio compares the two
    assert int(fields["requests"]) > 0 and int(fields["floor_requests"]) > 0
    assert float(fields["ratio_to_floor"]) == pytest.approx(
        float(fields["us_per_request"]) / float(fields["floor_us_per_request"]), rel=3e-3)
