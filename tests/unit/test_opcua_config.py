"""OPC UA server/point configuration: what loads, and what is refused with a message that names the field."""

from __future__ import annotations

import msgspec
import pytest

from drivers.opcua.config import OpcUaPoint, OpcUaServer, parse_browse_path


def server(**kw: object) -> OpcUaServer:
    base: dict[str, object] = {"name": "station", "endpoint": "opc.tcp://10.0.0.5:4840/station"}
    base.update(kw)
    return OpcUaServer(**base)  # type: ignore[arg-type]


def test_a_server_config_decodes_from_toml_like_data_with_defaults_from_the_model() -> None:
    raw = {
        "name": "station",
        "endpoint": "opc.tcp://10.0.0.5:4840",
        "points": [
            {"name": "tp", "node_id": "ns=2;s=Well01.TubingPressure", "deadband_abs": 0.05},
            {"name": "sp", "browse_path": "2:GatheringStation/2:Well01/2:Setpoint", "writable": True},
        ],
    }
    cfg = msgspec.convert(raw, OpcUaServer)
    assert cfg.mode == "subscribe" and cfg.security_policy == "None"
    assert cfg.point("tp").deadband_abs == 0.05
    assert cfg.point("sp").path_elements() == ((2, "GatheringStation"), (2, "Well01"), (2, "Setpoint"))


def test_unknown_fields_are_refused_so_typos_do_not_pass_silently() -> None:
    with pytest.raises(msgspec.ValidationError, match="deadbnd"):
        msgspec.convert({"name": "p", "node_id": "i=2258", "deadbnd": 1}, OpcUaPoint)


@pytest.mark.parametrize(
    "node_id",
    [
        "i=2258",
        "ns=2;s=Well01.TubingPressure",
        "ns=3;g=09087e75-8e5e-499b-954f-f2a9603db28a",
        "ns=4;b=M/RbKBsRVkePCePcx24oRA==",
        "nsu=urn:x:y;s=a;b",
    ],
)
def test_every_standard_node_id_form_is_accepted(node_id: str) -> None:
    assert OpcUaPoint(name="p", node_id=node_id).node_id == node_id


@pytest.mark.parametrize("node_id", ["Well01.TubingPressure", "ns=x;s=a", "ns=2;q=1", "s="])
def test_a_malformed_node_id_is_refused(node_id: str) -> None:
    with pytest.raises(ValueError, match="node_id"):
        OpcUaPoint(name="p", node_id=node_id)


def test_a_point_needs_exactly_one_address() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        OpcUaPoint(name="p")
    with pytest.raises(ValueError, match="exactly one"):
        OpcUaPoint(name="p", node_id="i=1", browse_path="0:Server")


@pytest.mark.parametrize("path", ["Station/Well01", "2:Station//2:Well01", "x:Station", ""])
def test_a_browse_path_element_without_a_namespace_index_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="browse_path"):
        OpcUaPoint(name="p", browse_path=path)


def test_browse_names_may_contain_colons_after_the_namespace_index() -> None:
    assert parse_browse_path("3:A:B/0:C") == ((3, "A:B"), (0, "C"))


def test_security_policy_and_mode_go_together_and_need_a_certificate_directory() -> None:
    with pytest.raises(ValueError, match="both"):
        server(security_policy="Basic256Sha256")
    with pytest.raises(ValueError, match="cert_dir"):
        server(security_policy="Basic256Sha256", security_mode="SignAndEncrypt")
    ok = server(security_policy="Basic256Sha256", security_mode="Sign", cert_dir="/var/lib/fieldgate/opcua")
    assert ok.security_mode == "Sign"


def test_a_password_without_a_user_name_is_refused() -> None:
    with pytest.raises(ValueError, match="username"):
        server(password="secret")


def test_endpoint_must_be_opc_tcp() -> None:
    with pytest.raises(ValueError, match=r"opc\.tcp"):
        server(endpoint="http://10.0.0.5:4840")


def test_duplicate_point_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        server(points=(OpcUaPoint(name="a", node_id="i=1"), OpcUaPoint(name="a", node_id="i=2")))


@pytest.mark.parametrize(
    "field", ["publishing_interval_s", "poll_interval_s", "timeout_s", "keepalive_s", "reconnect_min_s"]
)
def test_intervals_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        server(**{field: 0})


def test_back_off_bounds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="reconnect_max_s"):
        server(reconnect_min_s=10.0, reconnect_max_s=1.0)


def test_point_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="deadband_abs"):
        OpcUaPoint(name="p", node_id="i=1", deadband_abs=-1)
    with pytest.raises(ValueError, match="sampling_interval_s"):
        OpcUaPoint(name="p", node_id="i=1", sampling_interval_s=0)
    with pytest.raises(ValueError, match="queue_size"):
        OpcUaPoint(name="p", node_id="i=1", queue_size=0)
    with pytest.raises(ValueError, match="'/'"):
        OpcUaPoint(name="a/b", node_id="i=1")
