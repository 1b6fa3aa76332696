"""`cloud-broker` flags and config wiring without a process: certificates for --tls/--quic, QUIC options,
file transfer (flag, section, ACL), the operator commands on the parser, and NOTIFY_SOCKET parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_broker import operator
from cloud_broker.cli import _config_from_args, build_parser
from cloud_broker.config import BrokerConfig, ConfigError, ListenerConfig, QuicOptions, parse_config
from cloud_broker.core.model import ClientInfo
from cloud_broker.listeners.quic import listener_config
from cloud_broker.sdnotify import NotifySocket, status_line
from cloud_broker.server import _authorizer_for


def config_of(*argv: str) -> BrokerConfig:
    return _config_from_args(build_parser().parse_args(["run", *argv]))


def config_error(*argv: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_of(*argv)
    return info.value


# -- certificates -------------------------------------------------------------------------------


def test_a_quic_flag_without_a_certificate_names_the_flag_and_the_missing_files() -> None:
    err = config_error("--quic", "127.0.0.1:14567")
    assert err.path == "--quic" and "--cert" in err.reason and "cert_file" in err.reason


def test_cert_and_key_flags_go_into_every_tls_and_quic_listener_but_not_tcp() -> None:
    cfg = config_of("--tcp", "127.0.0.1:1883", "--tls", "127.0.0.1:8883", "--quic", "[::1]:14567",
                    "--cert", "s.pem", "--key", "s.key", "--ca", "ca.pem", "--require-client-cert")
    by_kind = {lc.kind: lc for lc in cfg.listeners}
    assert by_kind["tcp"].cert_file is None and by_kind["tcp"].ca_file is None
    for kind in ("tls", "quic"):
        lc = by_kind[kind]
        assert (lc.cert_file, lc.key_file, lc.ca_file) == ("s.pem", "s.key", "ca.pem")
        assert lc.require_client_cert
    assert by_kind["quic"].host == "::1"


def test_certificate_flags_without_a_listener_that_uses_them_are_refused() -> None:
    assert config_error("--tcp", "127.0.0.1:1883", "--cert", "s.pem", "--key", "s.key").path == "--cert"
    assert config_error("--tcp", "127.0.0.1:1883", "--require-client-cert").path == "--require-client-cert"


def test_require_client_cert_without_a_ca_is_refused_by_the_listener_config() -> None:
    err = config_error("--quic", "127.0.0.1:14567", "--cert", "s.pem", "--key", "s.key",
                       "--require-client-cert")
    assert "ca_file" in str(err)


# -- QUIC options -------------------------------------------------------------------------------


def quic_listener(**options: object) -> dict[str, object]:
    return {"kind": "quic", "host": "127.0.0.1", "port": 0, "cert_file": "s.pem", "key_file": "s.key",
            "quic": options}


def test_quic_options_from_the_config_become_the_listeners_tunables() -> None:
    cfg = parse_config({"listeners": [quic_listener(max_streams_bidi=4, idle_timeout_s=30.0,
                                                    max_connections=7)]})
    lc = cfg.listeners[0]
    options = lc.quic
    quic = listener_config(lc, max_streams_bidi=options.max_streams_bidi,
                           idle_timeout_s=options.idle_timeout_s, max_connections=options.max_connections)
    assert (quic.max_streams_bidi, quic.idle_timeout_s, quic.max_connections) == (4, 30.0, 7)


def test_quic_option_defaults_are_the_listeners_own_defaults() -> None:
    lc = ListenerConfig(kind="quic", cert_file="s.pem", key_file="s.key")
    default = listener_config(lc)
    assert (default.max_streams_bidi, default.idle_timeout_s, default.max_connections) == (
        lc.quic.max_streams_bidi, lc.quic.idle_timeout_s, lc.quic.max_connections)


@pytest.mark.parametrize(("options", "field"), [({"max_streams_bidi": 0}, "max_streams_bidi"),
                                                ({"idle_timeout_s": -1.0}, "idle_timeout_s"),
                                                ({"max_connections": 0}, "max_connections"),
                                                ({"max_stream": 3}, "max_stream")])
def test_a_bad_quic_option_is_named_by_its_path(options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"listeners": [quic_listener(**options)]})
    assert info.value.path.startswith("listeners[0].quic") and field in str(info.value)


def test_quic_options_on_a_tcp_listener_are_refused() -> None:
    with pytest.raises(ConfigError, match="quic listeners only"):
        parse_config({"listeners": [{"kind": "tcp", "quic": {"max_connections": 3}}]})
    assert ListenerConfig(kind="tcp").quic == QuicOptions()


# -- file transfer ------------------------------------------------------------------------------


def test_file_transfer_needs_a_data_dir() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"file_transfer": {"enable": True}})
    assert info.value.path == "file_transfer.enable" and "data_dir" in info.value.reason
    assert config_error("--tcp", "127.0.0.1:1883", "--file-transfer").path == "--file-transfer"


def test_the_file_transfer_flag_enables_it_and_keeps_the_config_files_settings(tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text(f'data_dir = "{tmp_path}"\n[file_transfer]\nio_threads = 2\n')
    cfg = config_of("--config", str(toml), "--file-transfer")
    assert cfg.file_transfer.enable and cfg.file_transfer.io_threads == 2
    assert not config_of("--config", str(toml)).file_transfer.enable


def test_with_file_transfer_on_the_acl_lets_anyone_send_files_and_read_only_its_own_responses() -> None:
    anonymous = ClientInfo("well-1", None, "test", 5)
    device = ClientInfo("well-2", "well-2", "test", 5, role="device")
    on = _authorizer_for(parse_config({"data_dir": "/tmp/x", "allow_anonymous": True,
                                       "file_transfer": {"enable": True}}))
    off = _authorizer_for(parse_config({"allow_anonymous": True}))
    assert on is not None and off is not None
    for client in (anonymous, device):
        assert on.can_publish(client, "$file/f1/init") and on.can_publish(client, "$file-async/f1/0")
        assert on.can_subscribe(client, f"$file-response/{client.client_id}")
        assert not on.can_subscribe(client, "$file-response/someone-else")
    assert on.can_subscribe(device, "fg/v1/well-2/#")  # the configured rules still apply behind them
    assert not off.can_publish(anonymous, "$file/f1/init")  # '#' never matches '$' topics


# -- operator commands --------------------------------------------------------------------------


def test_the_operator_commands_are_subcommands_of_cloud_broker() -> None:
    parser = build_parser()
    assert parser.parse_args(["agents", "--json"]).func is operator.cmd_agents
    pushed = parser.parse_args(["config", "push", "well-1", "agent.toml", "--dry-run"])
    assert (pushed.func, pushed.agent, pushed.file, pushed.dry_run) == (operator.cmd_config_push, "well-1",
                                                                        "agent.toml", True)
    cmd = parser.parse_args(["cmd", "well-1", "point.write", "point=p1", "value=3"])
    assert (cmd.func, cmd.agent, cmd.name, cmd.args) == (operator.cmd_cmd, "well-1", "point.write",
                                                         ["point=p1", "value=3"])


# -- NOTIFY_SOCKET ------------------------------------------------------------------------------


def test_notify_socket_paths_and_abstract_names_are_addresses_and_anything_else_is_off() -> None:
    assert NotifySocket.from_environ({}) is None
    path = "/run/systemd/notify"
    assert NotifySocket.from_environ({"NOTIFY_SOCKET": path}) == NotifySocket(path)
    assert NotifySocket.from_environ({"NOTIFY_SOCKET": "@sd"}) == NotifySocket(b"\0sd")
    assert NotifySocket.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert NotifySocket.from_environ({"NOTIFY_SOCKET": "@"}) is None


def test_the_watchdog_interval_is_ours_only_when_watchdog_pid_is_absent_or_our_pid() -> None:
    env = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000"}
    assert NotifySocket.from_environ(env, pid=42) == NotifySocket(b"\0sd", 30.0)
    assert NotifySocket.from_environ({**env, "WATCHDOG_PID": "42"}, pid=42) == NotifySocket(b"\0sd", 30.0)
    target = NotifySocket.from_environ({**env, "WATCHDOG_PID": "43"}, pid=42)
    assert target is not None and target.watchdog_interval_s is None
    for usec in ("0", "", "soon"):
        target = NotifySocket.from_environ({**env, "WATCHDOG_USEC": usec}, pid=42)
        assert target is not None and target.watchdog_interval_s is None


def test_a_status_text_is_folded_onto_one_line() -> None:
    assert status_line("3 connection(s)\nREADY=1") == "STATUS=3 connection(s) READY=1"
