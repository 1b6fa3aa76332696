"""The `cloud-broker` command: listening line, clean SIGTERM, clear failures for bad config and busy ports."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_broker.config import EX_CONFIG
from hil.net import free_port, wait_tcp_listening
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.packets import MQTT_5, ConnAck, Connect, Disconnect, ReasonCode

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "cloud-broker")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=30)


def test_run_prints_the_listening_line_and_sigterm_disconnects_v5_clients_with_0x8b() -> None:
    port = free_port()
    proc = subprocess.Popen([CLI, "run", "--tcp", f"127.0.0.1:{port}", "--allow-anonymous"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"cloud-broker: listening tcp 127.0.0.1:{port}"
        wait_tcp_listening(port, pid=proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(encode(Connect("c", keep_alive_s=0), MQTT_5))
            decoder = Decoder(MQTT_5)
            [ack] = decoder.feed(sock.recv(64))
            assert isinstance(ack, ConnAck) and ack.reason_code == 0
            proc.send_signal(signal.SIGTERM)
            data = b""
            while chunk := sock.recv(64):
                data += chunk
        assert decoder.feed(data) == [Disconnect(ReasonCode.SERVER_SHUTTING_DOWN)]
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_a_port_in_use_is_a_clear_nonzero_exit() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("run", "--tcp", f"127.0.0.1:{port}", "--allow-anonymous")
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr


def test_quic_without_a_certificate_is_a_clear_config_error() -> None:
    result = cli("run", "--quic", "127.0.0.1:14567")
    assert result.returncode == EX_CONFIG
    assert "quic" in result.stderr and "cert_file" in result.stderr


def test_check_names_the_bad_field_of_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text('allow_anonymous = true\n[[listeners]]\nport = 1883\n[limits]\nreceive_maximum = 0\n')
    result = cli("check", "--config", str(cfg))
    assert result.returncode == EX_CONFIG
    assert "limits" in result.stderr and "receive_maximum" in result.stderr


def test_check_accepts_a_good_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text('allow_anonymous = true\ndata_dir = "/tmp/x"\n[[listeners]]\nhost = "127.0.0.1"\n'
                   'port = 1883\n[limits]\nmaximum_qos = 1\n[features]\nretain_available = false\n')
    result = cli("check", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "tcp 127.0.0.1:1883" in result.stdout


def test_run_without_listeners_says_what_to_give() -> None:
    result = cli("run")
    assert result.returncode == EX_CONFIG and "--tcp" in result.stderr


def test_the_example_config_is_valid_and_documents_every_key() -> None:
    import tomllib

    import msgspec

    from cloud_broker.config import BrokerConfig

    example = Path(__file__).resolve().parents[2] / "cloud_broker" / "broker.example.toml"
    result = cli("check", "--config", str(example))
    assert result.returncode == 0, result.stderr
    text = example.read_text()
    documented = tomllib.loads(text)
    defaults = msgspec.to_builtins(BrokerConfig())
    for section, fields in defaults.items():
        if isinstance(fields, dict):
            for key in fields:
                assert (f"\n{key} =" in text or f"# {key} =" in text
                        or f"[[{section}.{key}]]" in text), f"{section}.{key} is not documented"
        else:
            assert section in documented or f"# {section} =" in text, f"{section} is not documented"


def test_device_add_list_remove_manage_the_credentials_file(tmp_path: Path) -> None:
    added = cli("device", "add", "well-1", "--data", str(tmp_path))
    assert added.returncode == 0 and "password: " in added.stdout
    assert cli("device", "list", "--data", str(tmp_path)).stdout.split() == ["well-1", "device"]
    assert cli("device", "remove", "well-1", "--data", str(tmp_path)).returncode == 0
    assert cli("device", "list", "--data", str(tmp_path)).stdout == ""
    assert cli("device", "remove", "well-1", "--data", str(tmp_path)).returncode == 1


def test_metrics_are_served_for_prometheus_when_enabled(tmp_path: Path) -> None:
    import urllib.request

    port, metrics_port = free_port(), free_port()
    cfg = tmp_path / "broker.toml"
    cfg.write_text(f'allow_anonymous = true\n[[listeners]]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[metrics]\nenabled = true\nport = {metrics_port}\n')
    proc = subprocess.Popen([CLI, "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("cloud-broker: listening tcp")
        assert proc.stdout.readline().strip() == f"cloud-broker: metrics http://127.0.0.1:{metrics_port}/metrics"
        wait_tcp_listening(port, pid=proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(encode(Connect("m", keep_alive_s=0), MQTT_5))
            sock.recv(64)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
        assert "fieldgate_broker_clients_connected 1.0" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.communicate()
