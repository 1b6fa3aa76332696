"""What the driver builds once per configuration object and reuses: keyed by the object's identity (pure).

Decoders, block decoders and card layouts are looked up on every poll of every device; hashing the
frozen config structs they come from (tuples of points) would cost more than building them saved.
So they are keyed by `id()` of an object the configuration keeps alive, with the object itself
stored beside the value: a recycled id of a dropped object never matches. `extra` values that must
also be equal (a block's start and count) are part of the match. The table is cleared when it
reaches `limit` entries: configurations come and go with reloads, a fleet shares a handful.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class IdentityMemo(Generic[T]):
    """`get(anchor, extra, build, *args)`: the value built by `build(*args)` for this anchor object."""

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int) -> None:
        self._entries: dict[int, tuple[object, tuple[object, ...], T]] = {}
        self._limit = limit

    def get(self, anchor: object, extra: tuple[object, ...], build: Callable[..., T], *args: object) -> T:
        hit = self._entries.get(id(anchor))
        if hit is not None and hit[0] is anchor and hit[1] == extra:
            return hit[2]
        value = build(*args)
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[id(anchor)] = (anchor, extra, value)
        return value
