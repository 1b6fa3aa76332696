"""ACL rules (placeholders, filter containment, operator role) and the device authenticator (scrypt
credentials file, certificate identity, rate-limited failures with backoff) with a hand-moved clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_broker.acl import Acl, AclRule, default_rules, filter_within
from cloud_broker.auth import (
    DeviceAuthenticator,
    FailureLimiter,
    load_credentials,
    make_credential,
    save_credentials,
)
from cloud_broker.core.model import AuthRequest, ClientInfo
from uplink.mqtt.packets import ReasonCode


def device(name: str, role: str | None = "device", client_id: str | None = None) -> ClientInfo:
    return ClientInfo(client_id or name, name, "tcp:10.0.0.1:5000", 5, None, role)


@pytest.mark.parametrize(("flt", "outer", "inside"), [
    ("fg/v1/d1/#", "fg/v1/d1/#", True),
    ("fg/v1/d1/+/x", "fg/v1/d1/#", True),
    ("fg/v1/d1", "fg/v1/d1/#", True),  # 'a/#' matches 'a' itself (MQTT 4.7.1.2)
    ("fg/v1/#", "fg/v1/d1/#", False),
    ("fg/v1/+/cmd", "fg/v1/d1/#", False),
    ("fg/v1/d1/cmd", "fg/v1/+/cmd", True),
    ("$SYS/broker/uptime", "#", False),
    ("a/b", "a/+", True),
    ("a/+", "a/b", False),
])
def test_a_subscription_filter_is_inside_a_rule_only_if_every_topic_it_matches_is(
        flt: str, outer: str, inside: bool) -> None:
    assert filter_within(flt, outer) is inside


def test_a_device_touches_only_its_own_tree_and_cannot_command_itself() -> None:
    acl = Acl(default_rules())
    d1 = device("d1")
    assert acl.can_publish(d1, "fg/v1/d1/data/telemetry")
    assert not acl.can_publish(d1, "fg/v1/d2/data/telemetry")
    assert not acl.can_publish(d1, "fg/v1/d1/cmd")
    assert acl.can_subscribe(d1, "fg/v1/d1/cmd")
    assert acl.can_subscribe(d1, "$share/g/fg/v1/d1/#")
    assert not acl.can_subscribe(d1, "fg/v1/#")
    assert not acl.can_subscribe(d1, "#")


def test_the_operator_may_command_every_device_but_not_forge_their_data() -> None:
    acl = Acl(default_rules())
    op = device("ops", "operator")
    assert acl.can_publish(op, "fg/v1/d1/cmd") and acl.can_publish(op, "fg/v1/d2/cmd")
    assert not acl.can_publish(op, "fg/v1/d1/data/telemetry")
    assert acl.can_subscribe(op, "fg/v1/+/data/#") and acl.can_subscribe(op, "$SYS/#")


def test_a_user_name_with_wildcards_or_slashes_never_widens_a_placeholder_rule() -> None:
    acl = Acl(default_rules())
    for evil in ("#", "+", "d1/../d2", ""):
        client = ClientInfo("x", evil, "p", 5, None, "device")
        assert not acl.can_publish(client, "fg/v1/d2/data/x")
        assert not acl.can_subscribe(client, "fg/v1/#")


def test_clientid_placeholders_and_first_match_wins_with_default_deny() -> None:
    acl = Acl([AclRule("*", "publish", "dev/${clientid}/secret", allow=False),
               AclRule("*", "all", "dev/${clientid}/#")])
    c = device("u", "device", client_id="c9")
    assert acl.can_publish(c, "dev/c9/x") and not acl.can_publish(c, "dev/c9/secret")
    assert not acl.can_publish(c, "dev/u/x") and not acl.can_publish(c, "other")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    path = tmp_path / "devices.json"
    save_credentials(path, {"d1": make_credential("d1", b"right"),
                            "ops": make_credential("ops", b"op", "operator")})
    return path


def req(username: str | None, password: bytes | None, peer: str = "tcp:10.0.0.1:5000",
        cert: str | None = None) -> AuthRequest:
    return AuthRequest(1, username or "cid", username, password, peer, cert)


def test_the_credentials_file_holds_salted_hashes_never_passwords(creds: Path) -> None:
    text = creds.read_text()
    assert "right" not in text and creds.stat().st_mode & 0o077 == 0
    loaded = load_credentials(creds)
    assert loaded["d1"].check(b"right") and not loaded["d1"].check(b"wrong")
    assert loaded["d1"].salt != loaded["ops"].salt


def test_devices_log_in_with_their_password_and_get_their_role(creds: Path) -> None:
    auth = DeviceAuthenticator(creds)
    assert auth.authenticate(req("d1", b"right")).role == "device"
    assert auth.authenticate(req("ops", b"op")).role == "operator"
    assert auth.authenticate(req("d1", b"wrong")).reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert auth.authenticate(req("ghost", b"x")).reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert auth.failed_logins == 2


def test_repeated_failures_are_refused_with_growing_backoff_per_ip_and_per_user(creds: Path) -> None:
    clock = Clock()
    auth = DeviceAuthenticator(creds, limiter=FailureLimiter(free_failures=2, base_s=1.0),
                               ip_limiter=FailureLimiter(free_failures=4, base_s=1.0), clock=clock)
    for _ in range(2):
        assert auth.authenticate(req("d1", b"wrong")).reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    # Blocked now, even with the right password, from this IP and for this user from elsewhere.
    assert auth.authenticate(req("d1", b"right")).reason_code == ReasonCode.CONNECTION_RATE_EXCEEDED
    assert auth.authenticate(req("d1", b"right", peer="tcp:10.9.9.9:1")).reason_code == 0x9F
    # Other users from the same IP still get in until the IP's own, larger allowance is spent.
    assert auth.authenticate(req("ops", b"op")).reason_code == 0
    clock.now += 1.5
    assert auth.authenticate(req("d1", b"wrong")).reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    clock.now += 1.5  # the third failure doubled the wait to 2 s
    assert auth.authenticate(req("d1", b"right")).reason_code == ReasonCode.CONNECTION_RATE_EXCEEDED
    clock.now += 1.0
    assert auth.authenticate(req("d1", b"right")).reason_code == 0
    assert auth.rate_limited == 3
    for _ in range(2):
        auth.authenticate(req("ghost", b"x"))  # the IP's 4th and 5th failures: now the IP is blocked
    assert auth.authenticate(req("ops", b"op")).reason_code == ReasonCode.CONNECTION_RATE_EXCEEDED
    assert auth.authenticate(req("ops", b"op", peer="tcp:10.0.0.2:1")).reason_code == 0


def test_a_certificate_identity_logs_in_as_its_device_and_cannot_claim_another(creds: Path) -> None:
    auth = DeviceAuthenticator(creds)
    ok = auth.authenticate(req(None, None, cert="d1"))
    assert (ok.reason_code, ok.username, ok.role) == (0, "d1", "device")
    assert auth.authenticate(req("ops", None, cert="d1")).reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert auth.authenticate(req(None, None, cert="stranger")).reason_code == ReasonCode.NOT_AUTHORIZED


def test_a_device_added_while_running_can_log_in_at_once(creds: Path) -> None:
    auth = DeviceAuthenticator(creds)
    assert auth.authenticate(req("new", b"pw")).reason_code != 0
    table = load_credentials(creds)
    table["new"] = make_credential("new", b"pw")
    save_credentials(creds, table)
    assert auth.authenticate(req("new", b"pw")).reason_code == 0
