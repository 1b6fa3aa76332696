"""drivers.modbus.memo.IdentityMemo: built once per anchor object, never for a look-alike or other extras."""

from __future__ import annotations

from drivers.modbus.memo import IdentityMemo


def test_a_value_is_built_once_per_anchor_and_extras_and_equal_objects_do_not_share_it() -> None:
    builds: list[tuple[int, ...]] = []

    def build(*args: int) -> tuple[int, ...]:
        builds.append(args)
        return args

    memo: IdentityMemo[tuple[int, ...]] = IdentityMemo(limit=10)
    anchor, twin = (1, 2), tuple([1, 2])  # equal, but two objects
    assert memo.get(anchor, (0,), build, 1) == (1,)
    assert memo.get(anchor, (0,), build, 2) == (1,)  # cached: build not called again
    assert memo.get(anchor, (5,), build, 3) == (3,)  # other extras: rebuilt
    assert memo.get(twin, (5,), build, 4) == (4,)  # an equal but different anchor: its own entry
    assert builds == [(1,), (3,), (4,)]


def test_the_table_is_cleared_at_its_limit() -> None:
    memo: IdentityMemo[int] = IdentityMemo(limit=2)
    anchors = [object() for _ in range(3)]
    for n, a in enumerate(anchors):
        memo.get(a, (), lambda n=n: n)
    assert memo.get(anchors[0], (), lambda: 99) == 99  # dropped by the clear: built again
    assert memo.get(anchors[2], (), lambda: 77) == 2  # kept: the newest entry survives
