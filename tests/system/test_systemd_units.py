"""systemd integration: units pass systemd's own checks, install.sh stages a working tree, hardening holds."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.config import EX_CONFIG, AgentSection, load_config
from tests.conftest import require_binary

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
INSTALL = SYSTEMD_DIR / "install.sh"
HOST_UNITS = Path("/usr/lib/systemd/system")
SERVICES = {"edge-agent": "agent.toml", "cloud-broker": "broker.toml"}


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-venv", *args],
                          capture_output=True, text=True, timeout=60)


def stage(root: Path, name: str) -> Path:
    """A staged system with `name` installed, systemd's own units, and a stand-in for the venv's script."""
    proc = install(root, *(["--broker"] if name == "cloud-broker" else []))
    assert proc.returncode == 0, proc.stderr
    # verify resolves dependencies (sysinit.target, ...) inside the root, so systemd's units go there too.
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    exe = root / "opt" / name / "venv/bin" / name
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return root / "etc/systemd/system" / f"{name}.service"


def verify(root: Path, name: str) -> str:
    """systemd-analyze verify's diagnostics for a staged unit ('' means clean): it exits 0 on warnings."""
    analyze = require_binary("systemd-analyze")
    proc = subprocess.run([analyze, "verify", f"--root={root}", f"{name}.service"],
                          capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip() or ("" if proc.returncode == 0 else f"exit {proc.returncode}")


def directives(unit: Path) -> dict[str, list[str]]:
    """`Section.Key` -> values in order (keys may repeat), comments and blank lines skipped."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_unit_passes_systemd_analyze_verify_without_a_single_diagnostic(
    tmp_path: Path, name: str,
) -> None:
    stage(tmp_path, name)
    assert verify(tmp_path, name) == ""


def test_verify_as_used_here_does_catch_a_misspelled_directive_and_a_missing_program(tmp_path: Path) -> None:
    unit = stage(tmp_path, "edge-agent")
    unit.write_text(unit.read_text().replace("WatchdogSec=30", "WatchdogSecs=30"))
    assert "Unknown key 'WatchdogSecs'" in verify(tmp_path, "edge-agent")
    unit.write_text(unit.read_text().replace("WatchdogSecs=30", "WatchdogSec=30"))
    (tmp_path / "opt/edge-agent/venv/bin/edge-agent").unlink()
    assert "/opt/edge-agent/venv/bin/edge-agent" in verify(tmp_path, "edge-agent")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_unit_declares_notify_watchdog_restart_policy_and_its_own_user_and_state(name: str) -> None:
    d = directives(SYSTEMD_DIR / f"{name}.service")
    config = f"/etc/{name}/{SERVICES[name]}"
    assert d["Service.ExecStart"] == [f"/opt/{name}/venv/bin/{name} run --config {config}"]
    assert d["Service.Type"] == ["notify"]
    assert d["Service.NotifyAccess"] == ["main"]
    assert d["Service.WatchdogSec"] == ["30"]
    assert d["Service.Restart"] == ["on-failure"]
    assert d["Service.RestartSec"] == ["5"]
    assert d["Service.RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert d["Service.User"] == [name]
    assert d["Service.StateDirectory"] == [name]
    assert d["Service.ConfigurationDirectory"] == [name]
    assert d["Install.WantedBy"] == ["multi-user.target"]
    for key, value in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("NoNewPrivileges", "yes"),
                       ("PrivateTmp", "yes"), ("ProtectKernelTunables", "yes"),
                       ("ProtectControlGroups", "yes"), ("LockPersonality", "yes"),
                       ("MemoryDenyWriteExecute", "yes"),
                       ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK")]:
        assert d[f"Service.{key}"] == [value], key


def test_the_agent_unit_reaches_serial_ports_and_outlasts_the_drain_on_stop() -> None:
    d = directives(SYSTEMD_DIR / "edge-agent.service")
    assert d["Service.SupplementaryGroups"] == ["dialout"]
    assert {"char-ttyS rw", "char-ttyUSB rw"} <= set(d["Service.DeviceAllow"])
    assert "PrivateDevices" not in " ".join(d)  # it would hide /dev/ttyS*
    drivers_stop_s, uplink_close_s = 5, 2  # agent/app.py: driver cancel wait, uplink close timeout
    clean_stop_s = AgentSection(id="x").drain_on_stop_s + drivers_stop_s + uplink_close_s
    assert int(d["Service.TimeoutStopSec"][0]) > clean_stop_s
    # adjtimex (agent/clock.py reads the kernel's sync state) must survive the ~@privileged filter.
    assert d["Service.SystemCallFilter"][-1] == "adjtimex"
    assert "ProtectClock" not in " ".join(d)  # it would deny even the read-only adjtimex


def test_the_broker_unit_allows_many_connections() -> None:
    d = directives(SYSTEMD_DIR / "cloud-broker.service")
    assert int(d["Service.LimitNOFILE"][0]) >= 65536


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_systemd_rates_each_units_exposure_as_ok(tmp_path: Path, name: str) -> None:
    analyze = require_binary("systemd-analyze")
    stage(tmp_path, name)
    proc = subprocess.run([analyze, "security", "--offline=true", f"--root={tmp_path}", "--threshold=25",
                           f"{name}.service"], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exposure {m.group(1)} is above 2.5"


def test_install_into_a_staged_root_creates_units_users_directories_and_enables_the_agent(
    tmp_path: Path,
) -> None:
    sysusers = require_binary("systemd-sysusers")
    tmpfiles = require_binary("systemd-tmpfiles")
    require_binary("systemctl")
    proc = install(tmp_path)
    assert proc.returncode == 0, proc.stderr
    etc = tmp_path / "etc"
    unit = etc / "systemd/system/edge-agent.service"
    assert unit.read_bytes() == (SYSTEMD_DIR / "edge-agent.service").read_bytes()
    assert (etc / "sysusers.d/edge-agent.conf").is_file()
    assert (etc / "tmpfiles.d/edge-agent.conf").is_file()
    wants = etc / "systemd/system/multi-user.target.wants/edge-agent.service"
    assert os.readlink(wants) == "/etc/systemd/system/edge-agent.service"
    config = etc / "edge-agent/agent.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert load_config(config).agent.data_dir == "/var/lib/edge-agent"
    assert not (tmp_path / "opt").exists()  # --no-venv
    assert not list(tmp_path.glob("etc/*cloud-broker*"))

    # What the target's first boot does with the staged declarations:
    subprocess.run([sysusers, f"--root={tmp_path}"], check=True, capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":") for line in (etc / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (etc / "group").read_text().splitlines()}
    user = passwd["edge-agent"]
    assert user[5:] == ["/var/lib/edge-agent", "/usr/sbin/nologin"]
    assert "edge-agent" in groups["dialout"][3].split(",")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to chown in the staged root")
    subprocess.run([tmpfiles, f"--root={tmp_path}", "--create"], check=True, capture_output=True, timeout=60)
    state = (tmp_path / "var/lib/edge-agent").stat()
    assert (state.st_uid, state.st_gid, stat.S_IMODE(state.st_mode)) == (int(user[2]), int(user[3]), 0o750)
    cfg = config.stat()
    assert (cfg.st_uid, cfg.st_gid, stat.S_IMODE(cfg.st_mode)) == (0, int(groups["edge-agent"][2]), 0o640)


def test_install_is_idempotent_repairs_the_unit_and_never_overwrites_a_config(tmp_path: Path) -> None:
    assert install(tmp_path).returncode == 0
    unit = tmp_path / "etc/systemd/system/edge-agent.service"
    config = tmp_path / "etc/edge-agent/agent.toml"
    config.write_text('[agent]\nid = "pushed-7"\n[uplink]\nhost = "10.0.0.1"\n')
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = install(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "keeping existing config" in proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert unit.read_bytes() == (SYSTEMD_DIR / "edge-agent.service").read_bytes()
    assert load_config(config).agent.id == "pushed-7"


def test_install_with_broker_stages_the_cloud_broker_only(tmp_path: Path) -> None:
    proc = install(tmp_path, "--broker")
    assert proc.returncode == 0, proc.stderr
    etc = tmp_path / "etc"
    assert (etc / "systemd/system/cloud-broker.service").is_file()
    assert (etc / "systemd/system/multi-user.target.wants/cloud-broker.service").is_symlink()
    assert (etc / "sysusers.d/cloud-broker.conf").is_file()
    assert (etc / "cloud-broker/broker.toml").is_file()
    assert not list(tmp_path.rglob("*edge-agent*"))


def test_install_explains_itself_and_refuses_bad_usage(tmp_path: Path) -> None:
    helped = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0
    for option in ("--broker", "--root DIR", "--no-venv", "--start", "WHEEL"):
        assert option in helped.stdout
    unknown = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True,
                             timeout=30)
    assert unknown.returncode == 2 and "unknown option --frobnicate" in unknown.stderr
    start_staged = install(tmp_path, "--start")
    assert start_staged.returncode == 2 and "--start" in start_staged.stderr
    assert not (tmp_path / "etc").exists()


MDWE_CHILD = textwrap.dedent(
    """
    import ctypes, sqlite3, ssl, sys

    libc = ctypes.CDLL(None)
    assert libc.prctl(66, 0, 0, 0, 0) == 1, "PR_GET_MDWE: not in effect"  # inherited across exec
    import agent.app, agent.cli, agent.clock, agent.sdnotify, agent.watchdog
    from aioquic.quic.configuration import QuicConfiguration
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    key.public_key().verify(key.sign(b"config v7"), b"config v7")
    ssl.create_default_context()
    QuicConfiguration(is_client=True, alpn_protocols=["mqtt"])
    sqlite3.connect(":memory:").execute("create table t (x)")
    agent.clock.kernel_synced()
    assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7
    print("ok")
    """
)


def test_the_agent_and_its_libraries_run_under_memory_deny_write_execute() -> None:
    # MemoryDenyWriteExecute=yes is only safe if nothing needs writable+executable memory. The kernel's
    # PR_SET_MDWE (Linux >= 6.3) enforces the same rule for a child we exec.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(66, 0, 0, 0, 0) < 0:  # PR_GET_MDWE
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    launcher = (
        "import ctypes, os, sys\n"
        "assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0\n"  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", launcher, MDWE_CHILD], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
