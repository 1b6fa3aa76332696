"""`edge-agent run --loop`: uvloop when installed (auto), asyncio on request."""

from __future__ import annotations

import asyncio
import builtins
from typing import Any

import pytest

from agent.cli import build_parser, event_loop


def _hide_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_run_defaults_to_auto_and_accepts_asyncio() -> None:
    assert build_parser().parse_args(["run", "--config", "x.toml"]).loop == "auto"
    assert build_parser().parse_args(["run", "--config", "x.toml", "--loop", "asyncio"]).loop == "asyncio"


def test_asyncio_turns_uvloop_off() -> None:
    assert event_loop("asyncio") == ("asyncio", None)


def test_auto_takes_uvloop_when_it_is_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    name, factory = event_loop("auto")
    assert (name, factory) == ("uvloop", uvloop.new_event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(asyncio.sleep(0, "ran")) == "ran"
        assert isinstance(runner.get_loop(), uvloop.Loop)


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_uvloop(monkeypatch)
    assert event_loop("auto") == ("asyncio", None)


def test_insisting_on_a_missing_uvloop_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.config import EX_CONFIG

    _hide_uvloop(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        event_loop("uvloop")
    assert exit_info.value.code == EX_CONFIG
