"""[uplink] batch size bounds and the PUBACK 0x10 setting, validated at load with the field's path."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_toml

BASE = '[agent]\nid = "pad-07"\ndata_dir = "/tmp/fieldgate-unused"\n[uplink]\nhost = "127.0.0.1"\n'


@pytest.mark.parametrize("value", [0, -5, 1023, 268_435_456])
def test_a_batch_max_bytes_outside_1024_to_the_mqtt_maximum_is_refused_at_load(value: int) -> None:
    with pytest.raises(ConfigError, match=r"uplink: batch_max_bytes must be within 1024\.\.268435455"):
        parse_toml(BASE + f"batch_max_bytes = {value}\n")


@pytest.mark.parametrize("value", [1024, 256 * 1024, 268_435_455])
def test_a_batch_max_bytes_within_the_bounds_is_accepted(value: int) -> None:
    assert parse_toml(BASE + f"batch_max_bytes = {value}\n").uplink.batch_max_bytes == value


def test_no_matching_subscribers_settles_by_default_and_can_be_turned_off() -> None:
    assert parse_toml(BASE).uplink.settle_on_no_subscribers is True
    off = parse_toml(BASE + "settle_on_no_subscribers = false\n")
    assert off.uplink.settle_on_no_subscribers is False
