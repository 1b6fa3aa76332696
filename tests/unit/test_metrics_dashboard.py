"""The Grafana dashboard in the repo only queries metrics that the agent and broker actually export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from agent.metrics import render as render_agent
from cloud_broker.metrics import COUNTERS, GAUGES
from cloud_broker.metrics import render as render_broker
from tests.unit.test_metrics_render import snapshot

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "fieldgate.json"


def exported() -> set[str]:
    text = render_agent(snapshot()).decode() + render_broker(dict.fromkeys([*GAUGES, *COUNTERS], 1)).decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"fieldgate_(?:agent|broker)_\w+", e)}
    assert queried, "the dashboard queries nothing"
    missing = queried - exported()
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"
