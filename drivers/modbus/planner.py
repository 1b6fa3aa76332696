"""Plan the fewest Modbus block reads that cover a set of points, within device limits (pure).

Theory of operation. Points are grouped per table (coils, discrete inputs, input and holding
registers) and sorted by start address. A block is a run of consecutive points read with one request;
it is allowed when
  * its span (first start .. last end) is at most `max_registers` (or `max_bits` for bit tables),
  * every gap between its points is at most `max_gap` registers (gap-aware: a gap of g registers costs
    2*g bytes on the wire, so past the break-even point a separate request is cheaper; for bit tables
    a gap is counted in 16-bit units), and
  * no gap register lies in a learned forbidden range and no learned wall lies strictly inside it.
Among allowed partitions a dynamic programme picks the one with the fewest requests, and among those
the fewest wasted (gap) registers. Points are atomic: a multi-register value is never split.

Learned device limits. Many devices answer exception 02 (illegal data address) when a read touches
an unmapped register even if the points themselves are fine. `learn_illegal_address` turns such a
failure into a `DeviceLimits` fact (gap registers are forbidden; a gap-free block gets a wall in its
middle) so the next `plan_reads` avoids it. Repeated learning converges: every step removes a gap or
halves a block, and a one-point block that still fails is the point's own fault (the caller reports
that point BAD instead of learning).

A device may also accept fewer registers per request than the protocol's 125: it answers exception
03 (illegal data value: the quantity is out of its range) or simply returns fewer registers than
asked. `learn_max_count` turns that into a per-table cap (what it returned, else half the block), so
later plans stay under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from drivers.modbus.config import (
    BIT_TABLES,
    DEFAULT_MAX_GAP,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    ModbusPoint,
    Table,
)

# Tables in a stable order, so plans are deterministic.
_TABLE_ORDER: tuple[Table, ...] = ("holding", "input", "coil", "discrete_input")


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: `count` registers (or bits) of `table` from PDU address `start`."""

    table: Table
    start: int
    count: int
    points: tuple[ModbusPoint, ...]

    @property
    def end(self) -> int:
        return self.start + self.count

    def slice_of(self, point: ModbusPoint) -> slice:
        """Where the point's words sit in the block's response."""
        _, start = point.location()
        return slice(start - self.start, start - self.start + point.register_count())

    def gaps(self) -> list[tuple[int, int]]:
        """Half-open address ranges inside the block that belong to none of its points."""
        out: list[tuple[int, int]] = []
        cursor = self.start
        for p in sorted(self.points, key=lambda q: q.location()[1]):
            _, s = p.location()
            if s > cursor:
                out.append((cursor, s))
            cursor = max(cursor, s + p.register_count())
        return out


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """What a device has taught us. `forbidden[table]` holds half-open (lo, hi) address ranges that a
    block may not read as gap registers; a range with lo == hi is a wall a block may not straddle."""

    forbidden: dict[Table, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    max_count: dict[Table, int] = field(default_factory=dict)  # learned per-request caps

    def cap(self, table: Table, default: int) -> int:
        return min(default, self.max_count.get(table, default))

    def with_max_count(self, table: Table, count: int) -> DeviceLimits:
        caps = dict(self.max_count)
        caps[table] = min(count, caps.get(table, count))
        return DeviceLimits(self.forbidden, caps)

    def with_forbidden(self, table: Table, ranges: Iterable[tuple[int, int]]) -> DeviceLimits:
        merged = dict(self.forbidden)
        merged[table] = tuple(sorted(set(merged.get(table, ())) | set(ranges)))
        return DeviceLimits(merged, self.max_count)


def _conflicts(lo: int, hi: int, gap_lo: int, gap_hi: int) -> bool:
    if lo == hi:  # a wall at lo: only a gap that spans across it counts (checked by the caller)
        return False
    return gap_lo < hi and lo < gap_hi


def plan_spans(
    spans: Sequence[tuple[int, int]],
    *,
    max_count: int,
    max_gap: int,
    forbidden: Sequence[tuple[int, int]] = (),
) -> list[tuple[int, int, list[int]]]:
    """Partition (start, count) spans into the fewest reads of at most max_count units.

    Returns (start, count, indices into `spans`) per read, in address order. ValueError when a single
    span is longer than max_count.
    """
    if max_count < 1:
        raise ValueError("max_count must be >= 1")
    order = sorted(range(len(spans)), key=lambda k: (spans[k][0], spans[k][1], k))
    n = len(order)
    for k in order:
        if spans[k][1] > max_count:
            raise ValueError(f"span at {spans[k][0]} of {spans[k][1]} exceeds {max_count} per read")
    walls = sorted(lo for lo, hi in forbidden if lo == hi)
    ranges = [(lo, hi) for lo, hi in forbidden if lo < hi]
    inf = (n + 1, 0)
    # best[i] = (reads, wasted units) to cover the first i sorted spans; prev[i] = start of the last read
    best: list[tuple[int, int]] = [(0, 0)] + [inf] * n
    prev = [0] * (n + 1)
    for j in range(n):
        if best[j] == inf:
            continue
        start = spans[order[j]][0]
        end = start
        wasted = 0
        for i in range(j, n):
            s, c = spans[order[i]]
            if i > j and s > end:
                gap = s - end
                if gap > max_gap or (ranges and any(_conflicts(lo, hi, end, s) for lo, hi in ranges)):
                    break
                wasted += gap
            new_end = max(end, s + c)
            if new_end - start > max_count:
                break
            if walls and any(start < w < new_end and not _inside_one(spans, order, j, i, w) for w in walls):
                break
            end = new_end
            cand = (best[j][0] + 1, best[j][1] + wasted)
            if cand < best[i + 1]:
                best[i + 1] = cand
                prev[i + 1] = j
    out: list[tuple[int, int, list[int]]] = []
    i = n
    while i > 0:
        j = prev[i]
        idx = [order[k] for k in range(j, i)]
        start = spans[order[j]][0]
        end = max(spans[k][0] + spans[k][1] for k in idx)
        out.append((start, end - start, idx))
        i = j
    out.reverse()
    return out


def _inside_one(spans: Sequence[tuple[int, int]], order: Sequence[int], j: int, i: int, wall: int) -> bool:
    """True when the wall falls strictly inside one span of the run (a point is never split)."""
    return any(spans[order[k]][0] < wall < spans[order[k]][0] + spans[order[k]][1] for k in range(j, i + 1))


def plan_reads(
    points: Iterable[ModbusPoint],
    *,
    max_registers: int = MAX_REGISTERS_PER_READ,
    max_bits: int = MAX_BITS_PER_READ,
    max_gap: int = DEFAULT_MAX_GAP,
    limits: DeviceLimits | None = None,
) -> tuple[ReadBlock, ...]:
    """The fewest ReadBlocks covering every point exactly once, table by table in address order.

    Plans are memoized by their inputs (the points' definitions, the limits): a fleet of devices with
    one register map plans once, and the devices share the ReadBlocks (and what is compiled per block,
    such as their decoders)."""
    if not 1 <= max_registers <= MAX_REGISTERS_PER_READ:
        raise ValueError(f"max_registers must be in 1..{MAX_REGISTERS_PER_READ}")
    if not 1 <= max_bits <= MAX_BITS_PER_READ:
        raise ValueError(f"max_bits must be in 1..{MAX_BITS_PER_READ}")
    limits = limits or DeviceLimits()
    points = tuple(points)
    key = (points, max_registers, max_bits, max_gap, tuple(sorted(limits.forbidden.items())),
           tuple(sorted(limits.max_count.items())))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan_reads(points, max_registers, max_bits, max_gap, limits)
        if len(_PLANS) >= 1024:
            _PLANS.clear()  # configurations come and go with reloads; a fleet shares a handful
        _PLANS[key] = plan
    return plan


# (points, limits ...) -> plan. Keyed by value: equal point definitions give the same plan.
_PLANS: dict[tuple[object, ...], tuple[ReadBlock, ...]] = {}


def _plan_reads(points: tuple[ModbusPoint, ...], max_registers: int, max_bits: int, max_gap: int,
                limits: DeviceLimits) -> tuple[ReadBlock, ...]:
    by_table: dict[Table, list[ModbusPoint]] = {}
    for p in points:
        by_table.setdefault(p.location()[0], []).append(p)
    blocks: list[ReadBlock] = []
    for table in _TABLE_ORDER:
        pts = by_table.get(table)
        if not pts:
            continue
        bits = table in BIT_TABLES
        spans = [(p.location()[1], p.register_count()) for p in pts]
        for start, count, idx in plan_spans(
            spans,
            max_count=limits.cap(table, max_bits if bits else max_registers),
            max_gap=max_gap * 16 if bits else max_gap,
            forbidden=limits.forbidden.get(table, ()),
        ):
            blocks.append(ReadBlock(table, start, count, tuple(pts[k] for k in idx)))
    return tuple(blocks)


def learn_illegal_address(block: ReadBlock, limits: DeviceLimits) -> DeviceLimits | None:
    """Limits that keep the next plan away from what made `block` fail with exception 02.

    None when the block reads a single point (or points at one address) with no gap: then the point
    itself is unreadable and must be reported BAD, not planned around.
    """
    gaps = block.gaps()
    if gaps:
        return limits.with_forbidden(block.table, gaps)
    starts = sorted({p.location()[1] for p in block.points})
    if len(starts) < 2:
        return None
    wall = starts[len(starts) // 2]
    return limits.with_forbidden(block.table, [(wall, wall)])


def learn_max_count(block: ReadBlock, limits: DeviceLimits,
                    returned: int | None = None) -> DeviceLimits | None:
    """Limits capping requests of the block's table below `block.count`, after the device refused the
    quantity (exception 03) or returned only `returned` of the units asked.

    None when no smaller request can cover the block's longest point (nothing left to learn).
    """
    longest = max(p.register_count() for p in block.points)
    cap = returned if returned is not None and 0 < returned < block.count else block.count // 2
    cap = max(cap, longest)
    if cap >= block.count:
        return None
    return limits.with_max_count(block.table, cap)
