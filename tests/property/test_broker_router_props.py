"""The broker's Router (topic trie + per-topic match cache) against a naive oracle under random
subscribe / unsubscribe / match sequences: the cache never serves a stale answer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_broker.core.model import SubscriptionEntry
from cloud_broker.core.router import Router, SharedGroup
from uplink.mqtt.topics import topic_matches

LEVELS = st.sampled_from(["a", "b", "$SYS", "x"])
FILTER_LEVELS = st.sampled_from(["a", "b", "+", "$SYS", "x"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=3))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


topics = st.lists(LEVELS, min_size=1, max_size=4).map("/".join)
ops = st.lists(st.one_of(
    st.tuples(st.just("sub"), st.sampled_from(["c1", "c2", "c3"]), filters()),
    st.tuples(st.just("unsub"), st.sampled_from(["c1", "c2", "c3"]), filters()),
    st.tuples(st.just("match"), st.just(""), topics),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_router_matches_agree_with_a_naive_oracle_through_any_churn(
        steps: list[tuple[str, str, str]]) -> None:
    router = Router()
    model: dict[tuple[str, str], SubscriptionEntry] = {}
    for op, client, arg in steps:
        if op == "sub":
            old = model.pop((client, arg), None)
            if old is not None:
                router.remove(old)
            entry = model[(client, arg)] = SubscriptionEntry(client, arg, 1)
            router.add(entry)
        elif op == "unsub":
            found = model.pop((client, arg), None)
            if found is not None:
                assert router.remove(found)
        else:
            got = sorted((t.client_id, t.topic_filter) for t in router.match(arg)
                         if not isinstance(t, SharedGroup))
            want = sorted(k for k, e in model.items() if topic_matches(e.topic_filter, arg))
            assert got == want
