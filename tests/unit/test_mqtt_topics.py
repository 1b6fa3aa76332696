"""Unit tests for topic names, filters, shared subscriptions and the TopicTree index (spec 4.7, 4.8)."""

from __future__ import annotations

import pytest

from uplink.mqtt.errors import ProtocolError
from uplink.mqtt.packets import ReasonCode
from uplink.mqtt.topics import (
    TopicError,
    TopicTree,
    parse_shared,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)


@pytest.mark.parametrize(
    ("flt", "name", "expected"),
    [
        # The examples of MQTT 3.1.1 section 4.7.1.2 / MQTT 5.0 section 4.7.1.2.
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "sport/tennis", True),
        # Section 4.7.1.3.
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        # Section 4.7.2: wildcards at the first level never match '$' topics.
        ("#", "$SYS/broker/load", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        # Case sensitive, empty levels are levels, '/' is significant.
        ("ACCOUNTS", "Accounts", False),
        ("a//b", "a//b", True),
        ("a/+/b", "a//b", True),
        ("a/b/", "a/b", False),
        ("a/#", "a/", True),
        ("$share/g/a/+", "a/b", True),
        ("$share/g/#", "$SYS/x", False),
    ],
)
def test_filters_match_as_the_spec_examples_say(flt: str, name: str, expected: bool) -> None:
    assert topic_matches(flt, name) is expected


@pytest.mark.parametrize(
    "flt", ["#", "+", "a/#", "a/+/b", "+/+", "/", "//", "$SYS/#", "$share/g/a/#", "a b/ü"]
)
def test_valid_filters_pass(flt: str) -> None:
    validate_topic_filter(flt)


@pytest.mark.parametrize(
    "flt",
    [
        "",
        "a#",
        "a/#/b",
        "#/a",
        "a/b#",
        "a+",
        "a/+b",
        "++",
        "a\x00",
        "$share/g",
        "$share//a",
        "$share/g+/a",
        "$share/g/",
    ],
)
def test_invalid_filters_are_topic_filter_invalid(flt: str) -> None:
    with pytest.raises(TopicError) as exc:
        validate_topic_filter(flt)
    assert exc.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID


@pytest.mark.parametrize("name", ["", "a/+", "#", "a/#", "a\x00b", "a\ud800", "a" * 65536, "é" * 32768])
def test_invalid_names_are_topic_name_invalid(name: str) -> None:
    with pytest.raises(TopicError) as exc:
        validate_topic_name(name)
    assert exc.value.reason_code == ReasonCode.TOPIC_NAME_INVALID


@pytest.mark.parametrize("name", ["a", "/", "a//b", "$SYS/x", "é" * 32767, "a" * 65535, "x y"])
def test_valid_names_pass(name: str) -> None:
    validate_topic_name(name)


def test_topic_errors_are_protocol_errors_and_value_errors() -> None:
    with pytest.raises(ProtocolError):
        validate_topic_name("")
    with pytest.raises(ValueError):
        validate_topic_name("")


def test_shared_filters_split_into_group_and_filter() -> None:
    assert parse_shared("$share/g/a/b") == ("g", "a/b")
    assert parse_shared("$share/g/#") == ("g", "#")
    assert parse_shared("a/b") == (None, "a/b")
    assert parse_shared("$shared/g/a") == (None, "$shared/g/a")


def test_the_tree_returns_every_matching_value_including_duplicates() -> None:
    tree: TopicTree[str] = TopicTree()
    tree.add("a/+", "c1")
    tree.add("a/#", "c2")
    tree.add("#", "c3")
    tree.add("a/b", "c1")
    tree.add("$SYS/#", "sys")
    assert sorted(tree.match("a/b")) == ["c1", "c1", "c2", "c3"]
    assert sorted(tree.match("a")) == ["c2", "c3"]
    assert tree.match("$SYS/load") == ["sys"]
    assert len(tree) == 5


def test_removal_takes_one_entry_and_reports_absence() -> None:
    tree: TopicTree[str] = TopicTree()
    tree.add("a/b", "x")
    tree.add("a/b", "x")
    assert tree.remove("a/b", "x")
    assert tree.match("a/b") == ["x"]
    assert tree.remove("a/b", "x")
    assert not tree.remove("a/b", "x")
    assert not tree.remove("never/added", "x")
    assert not tree.remove("$share//bad", "x")
    assert len(tree) == 0
    assert tree.match("a/b") == []


def test_shared_subscriptions_are_grouped_per_share_name_and_filter() -> None:
    tree: TopicTree[str] = TopicTree()
    tree.add("$share/g/a/+", "m1")
    tree.add("$share/g/a/+", "m2")
    tree.add("$share/h/a/+", "m3")
    tree.add("$share/g/a/b", "m4")
    tree.add("a/+", "plain")
    plain, shared = tree.match_split("a/b")
    assert plain == ["plain"]
    assert sorted((g, sorted(m)) for g, m in shared) == [("g", ["m1", "m2"]), ("g", ["m4"]), ("h", ["m3"])]
    assert sorted(tree.match("a/b")) == ["m1", "m2", "m3", "m4", "plain"]
    # Removing a shared entry needs the shared filter: the plain filter is a different subscription.
    assert not tree.remove("a/+", "m1")
    assert tree.remove("$share/g/a/+", "m1")
    assert sorted(tree.match("a/b")) == ["m2", "m3", "m4", "plain"]


def test_adding_an_invalid_filter_raises_and_changes_nothing() -> None:
    tree: TopicTree[int] = TopicTree()
    with pytest.raises(TopicError):
        tree.add("a/#/b", 1)
    assert len(tree) == 0
    assert tree.match("a/x/b") == []
