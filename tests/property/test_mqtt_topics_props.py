"""Property tests: topic matching and the TopicTree index agree with a regex oracle built from the spec."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.property import mqtt_strategies as ms
from uplink.mqtt.topics import (
    TopicError,
    TopicTree,
    parse_shared,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)


def oracle_matches(flt: str, name: str) -> bool:
    """Spec section 4.7 by regular expression: '+' is one level, a final '#' any tail incl. the parent."""
    if flt.startswith("$share/"):
        flt = flt.split("/", 2)[2]
    if name.startswith("$") and flt[:1] in ("+", "#"):
        return False
    parts = flt.split("/")
    tail = ""
    if parts[-1] == "#":
        parts.pop()
        tail = "(?:/.*)?" if parts else ".*"
    pattern = "/".join("[^/]*" if p == "+" else re.escape(p) for p in parts) + tail
    return re.fullmatch(pattern, name, flags=re.DOTALL) is not None


def oracle_filter_valid(flt: str) -> bool:
    if not flt or "\x00" in flt:
        return False
    if flt.startswith("$share/"):
        rest = flt[len("$share/") :]
        if "/" not in rest:
            return False
        group, flt = rest.split("/", 1)
        if not group or "+" in group or "#" in group or not flt:
            return False
    lv = flt.split("/")
    return all(
        (x == "#" and i == len(lv) - 1) or x == "+" or ("+" not in x and "#" not in x)
        for i, x in enumerate(lv)
    )


filters_or_junk = st.one_of(ms.any_filters(), st.text(st.sampled_from("ab/+#$share"), max_size=12))


@settings(max_examples=500)
@given(flt=ms.any_filters(), name=ms.topic_names())
def test_topic_matches_agrees_with_the_regex_oracle(flt: str, name: str) -> None:
    assert topic_matches(flt, name) == oracle_matches(flt, name)


@settings(max_examples=300)
@given(name=ms.topic_names())
def test_a_filter_equal_to_the_name_always_matches_it(name: str) -> None:
    assert topic_matches(name, name)


@settings(max_examples=500)
@given(flt=filters_or_junk)
def test_filter_validation_agrees_with_the_oracle(flt: str) -> None:
    try:
        validate_topic_filter(flt)
    except TopicError as exc:
        assert exc.reason_code == 0x8F
        assert not oracle_filter_valid(flt)
    else:
        assert oracle_filter_valid(flt)


@settings(max_examples=300)
@given(name=st.text(st.sampled_from("ab/+#$\x00"), max_size=8))
def test_names_are_valid_exactly_when_non_empty_without_wildcards_or_nul(name: str) -> None:
    valid = bool(name) and not set(name) & {"+", "#", "\x00"}
    try:
        validate_topic_name(name)
    except TopicError as exc:
        assert exc.reason_code == 0x90
        assert not valid
    else:
        assert valid


@given(group=ms.share_names, flt=ms.topic_filters())
def test_shared_filters_split_into_share_name_and_filter(group: str, flt: str) -> None:
    assert parse_shared(f"$share/{group}/{flt}") == (group, flt)
    assert parse_shared(flt) == (None, flt) or flt.startswith("$share/")


@settings(max_examples=300)
@given(
    entries=st.lists(st.tuples(ms.any_filters(), st.integers(0, 5)), max_size=25),
    names=st.lists(ms.topic_names(), min_size=1, max_size=5),
)
def test_the_tree_matches_what_topic_matches_says_for_every_entry(
    entries: list[tuple[str, int]], names: list[str]
) -> None:
    tree: TopicTree[tuple[str, int]] = TopicTree()
    for flt, v in entries:
        tree.add(flt, (flt, v))
    assert len(tree) == len(entries)
    for name in names:
        expected = sorted(e for e in entries if oracle_matches(e[0], name))
        assert sorted(tree.match(name)) == expected


class TreeVersusList(RuleBasedStateMachine):
    """Adds and removes in any order keep the tree equal to a plain list of entries."""

    def __init__(self) -> None:
        super().__init__()
        self.tree: TopicTree[int] = TopicTree()
        self.model: list[tuple[str, int]] = []

    @rule(flt=ms.any_filters(), v=st.integers(0, 3))
    def add(self, flt: str, v: int) -> None:
        self.tree.add(flt, v)
        self.model.append((flt, v))

    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        if not self.model:
            return
        flt, v = data.draw(st.sampled_from(self.model))
        assert self.tree.remove(flt, v)
        self.model.remove((flt, v))

    @rule(flt=ms.any_filters(), v=st.integers(0, 3))
    def remove_maybe_absent(self, flt: str, v: int) -> None:
        present = (flt, v) in self.model
        assert self.tree.remove(flt, v) == present
        if present:
            self.model.remove((flt, v))

    @rule(name=ms.topic_names())
    def match(self, name: str) -> None:
        expected = sorted(v for f, v in self.model if oracle_matches(f, name))
        assert sorted(self.tree.match(name)) == expected

    @invariant()
    def sizes_agree(self) -> None:
        assert len(self.tree) == len(self.model)

    @invariant()
    def removing_everything_leaves_no_nodes_behind(self) -> None:
        if not self.model:
            assert not self.tree._root.children  # pruning keeps churn from leaking memory


TreeVersusList.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_tree_behaves_like_a_list_of_entries = TreeVersusList.TestCase


@pytest.mark.parametrize("bad", ["$share/g", "$share//a", "$share/+/a", "$share/g#/a", "$share/g/"])
def test_malformed_shared_filters_are_rejected_by_parse_shared(bad: str) -> None:
    with pytest.raises(TopicError):
        parse_shared(bad)
