"""ConfigStore: pending -> current commit, abandon, and an interrupted trial rolled back at the next start."""

from __future__ import annotations

from pathlib import Path

import tomli_w

from agent.config import parse_toml
from agent.configstore import ConfigStore
from agent.ops import _changed_buses, _changed_devices, _changed_parts, resolve_startup_config


def text(data_dir: Path, version: str, port: int = 1883, devices: int = 1) -> str:
    return tomli_w.dumps(
        {
            "version": version,
            "agent": {"id": "w1", "data_dir": str(data_dir)},
            "uplink": {"host": "127.0.0.1", "port": port},
            "modbus": [{"name": f"d{i}", "host": "10.0.0.1", "port": 502 + i} for i in range(devices)],
        }
    )


def test_a_commit_makes_the_pending_config_last_known_good_and_keeps_the_previous(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    store.begin(text(tmp_path, "1"))
    store.commit()
    store.begin(text(tmp_path, "2"))
    store.commit()
    stored = store.load_committed()
    assert stored is not None and stored.config.version == "2"
    assert 'version = "1"' in store.previous.read_text()
    assert not store.pending.exists()


def test_an_abandoned_trial_leaves_current_untouched(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    store.begin(text(tmp_path, "1"))
    store.commit()
    store.begin(text(tmp_path, "2"))
    store.abandon()
    assert store.load_committed().config.version == "1"  # type: ignore[union-attr]
    assert 'version = "2"' in store.rejected.read_text()


def test_a_trial_interrupted_by_a_crash_is_rolled_back_at_the_next_start(tmp_path: Path) -> None:
    base_text = text(tmp_path, "base")
    base = parse_toml(base_text)
    store = ConfigStore(tmp_path)
    store.begin(text(tmp_path, "1"))
    store.commit()
    store.begin(text(tmp_path, "2"))  # ... and the power goes
    cfg, used, source = resolve_startup_config(base, base_text)
    assert (cfg.version, source) == ("1", "pushed") and used is not None and 'version = "1"' in used
    assert not store.pending.exists() and store.rejected.exists()


def test_a_committed_config_that_no_longer_validates_falls_back_to_the_base(tmp_path: Path) -> None:
    base_text = text(tmp_path, "base")
    store = ConfigStore(tmp_path)
    store.dir.mkdir(parents=True)
    store.current.write_text(base_text.replace("[uplink]", "[uplink]\nretired_option = 1"))
    cfg, _, source = resolve_startup_config(parse_toml(base_text), base_text)
    assert (cfg.version, source) == ("base", "base")


def test_only_changed_parts_devices_and_buses_are_named(tmp_path: Path) -> None:
    old = parse_toml(text(tmp_path, "1", devices=2))
    new = parse_toml(text(tmp_path, "2", devices=3))
    assert _changed_parts(old, new) == ["modbus"]
    assert _changed_devices(old, new) == {"d2"}
    assert _changed_buses(old, new) == {("tcp", "10.0.0.1", 504)}
    moved = parse_toml(text(tmp_path, "3", port=8883, devices=2))
    assert _changed_parts(old, moved) == ["uplink"] and not _changed_buses(old, moved)
