"""Agent config: defaults from the model, and every error names the offending field by path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import EX_CONFIG, ConfigError, load_config, parse_config

MINIMAL = {"agent": {"id": "pad-7"}, "uplink": {"host": "127.0.0.1"}}


def test_a_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.uplink.port == 1883
    assert cfg.queue.synchronous == "FULL"
    assert cfg.client_id == "pad-7"
    assert cfg.modbus == ()


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"agent": {"id": "pad-7"}}, "uplink"),
        ({**MINIMAL, "uplink": {"host": "h", "port": "x"}}, "uplink.port"),
        ({**MINIMAL, "uplink": {"host": "h", "port": 70000}}, "uplink"),
        ({**MINIMAL, "uplink": {"host": "h", "prot": 1}}, "uplink.prot"),
        ({**MINIMAL, "agent": {"id": "bad/id"}}, "agent"),
        ({**MINIMAL, "queue": {"synchronous": "OFF"}}, "queue.synchronous"),
        (
            {**MINIMAL, "modbus": [{"name": "w1", "host": "h"}, {"name": "w2", "host": "h", "port": "p"}]},
            "modbus[1].port",
        ),
    ],
)
def test_an_invalid_config_names_the_bad_field(doc: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert info.value.path == path, str(info.value)


def test_an_unreadable_or_non_toml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\nid=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_edge_agent_check_exits_with_ex_config_and_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nid = "pad-7"\n[uplink]\nhost = "127.0.0.1"\nport = "mqtt"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == EX_CONFIG
    assert "uplink.port" in proc.stderr
    cfg.write_text('[agent]\nid = "pad-7"\n[uplink]\nhost = "127.0.0.1"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stdout


def test_the_a11_profile_expands_to_the_a11_map_and_card_with_overrides() -> None:
    cfg = parse_config(
        {
            **MINIMAL,
            "modbus": [
                {
                    "name": "well-001",
                    "host": "10.0.0.5",
                    "unit_id": 3,
                    "profile": "a11",
                    "points": [
                        {"name": "tubing_pressure", "address": 40300, "type": "f32", "deadband": 0.05},
                        {"name": "extra", "address": 40006},
                    ],
                    "card": {"interval_s": 600},
                }
            ],
        }
    )
    (dev,) = cfg.modbus
    names = [p.name for p in dev.points]
    assert names.count("tubing_pressure") == 1 and "extra" in names and "casing_pressure" in names
    assert next(p for p in dev.points if p.name == "tubing_pressure").deadband == 0.05
    assert dev.card is not None and dev.card.interval_s == 600 and dev.card.load_curve == 41251


@pytest.mark.parametrize("timeout_s", [0, -1, 7200])
def test_a_card_trigger_timeout_outside_its_range_is_refused_with_its_path(timeout_s: float) -> None:
    device = {"name": "w", "host": "h", "profile": "a11", "card": {"trigger_timeout_s": timeout_s}}
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "modbus": [device]})
    assert info.value.path.startswith("modbus[0]") and "trigger_timeout_s" in str(info.value)


def test_an_unknown_profile_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "modbus": [{"name": "w", "host": "h", "profile": "a12"}]})
    assert info.value.path == "modbus[0].profile"


def test_a_missing_top_level_section_is_named_by_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"uplink": {"host": "h"}})
    assert info.value.path == "agent"
