"""In-memory lease bookkeeping shared by every queue implementation (pure: time is passed in).

Theory of operation: a lease is a claim on some seqs until `expires_s` on the caller's monotonic clock.
A seq is free when nobody holds it or its holder's lease expired at `now_s`; leasing a free seq moves
the claim to the new lease (the old lease loses it silently). Settling a batch deletes its acked and
rejected seqs whoever holds them now (an ack proves delivery, so deleting is right even after expiry),
and releases only the seqs its lease still holds, so a late settle never frees another lease's records.
Nothing here is persisted: a restart forgets every lease, which makes all unsettled records leaseable
again (at-least-once).
"""

from __future__ import annotations

from collections.abc import Iterable

from store_forward.model import Batch


class LeaseBook:
    """Who holds which seq until when, and how often each seq was handed out."""

    def __init__(self) -> None:
        self._holder: dict[int, tuple[int, float]] = {}  # seq -> (lease_id, expires_s)
        self._attempts: dict[int, int] = {}
        self._next_lease_id = 1
        self._last_now_s: float | None = None

    def observe(self, now_s: float) -> None:
        """Remember the latest time seen, so `held_count` can judge expiry without a clock."""
        if self._last_now_s is None or now_s > self._last_now_s:
            self._last_now_s = now_s

    def is_free(self, seq: int, now_s: float) -> bool:
        held = self._holder.get(seq)
        return held is None or held[1] <= now_s

    def attempts(self, seq: int) -> int:
        return self._attempts.get(seq, 0)

    def grant(self, seqs: Iterable[int], now_s: float, lease_s: float) -> tuple[int, float]:
        """Hold seqs under a new lease; returns (lease_id, expires_s)."""
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        expires_s = now_s + lease_s
        for seq in seqs:
            self._holder[seq] = (lease_id, expires_s)
            self._attempts[seq] = self._attempts.get(seq, 0) + 1
        return lease_id, expires_s

    def release(self, lease_id: int, seqs: Iterable[int]) -> None:
        """Drop this lease's claim on seqs it still holds (a newer lease's claim stays)."""
        for seq in seqs:
            held = self._holder.get(seq)
            if held is not None and held[0] == lease_id:
                del self._holder[seq]

    def forget(self, seqs: Iterable[int]) -> None:
        """The seqs were deleted: drop every trace of them."""
        for seq in seqs:
            self._holder.pop(seq, None)
            self._attempts.pop(seq, None)

    def held_count(self) -> int:
        if self._last_now_s is None:
            return len(self._holder)
        now_s = self._last_now_s
        return sum(1 for _, expires_s in self._holder.values() if expires_s > now_s)

    def clear(self) -> None:
        self._holder.clear()
        self._attempts.clear()


def split_settlement(batch: Batch, generation: str, acked: Iterable[int],
                     rejected: Iterable[int]) -> tuple[list[int], list[int], list[int]]:
    """Check a settle call against its batch; returns (acked, rejected, released) seq lists.

    A seq outside the batch, or both acked and rejected, is a caller bug: raise before touching data."""
    if batch.records and batch.generation != generation:
        raise ValueError(f"batch of generation {batch.generation!r} settled on store {generation!r}")
    in_batch = set(batch.seqs)
    acked_l = list(dict.fromkeys(acked))
    rejected_l = list(dict.fromkeys(rejected))
    stray = [s for s in (*acked_l, *rejected_l) if s not in in_batch]
    if stray:
        raise ValueError(f"settle: seqs {stray[:10]} are not in lease {batch.lease_id}")
    both = set(acked_l) & set(rejected_l)
    if both:
        raise ValueError(f"settle: seqs {sorted(both)[:10]} are both acked and rejected")
    done = set(acked_l) | set(rejected_l)
    released = [s for s in batch.seqs if s not in done]
    return acked_l, rejected_l, released


def choose(candidates: Iterable[tuple[int, int]], book: LeaseBook, now_s: float, max_items: int,
           max_bytes: int | None) -> list[int]:
    """Pick seqs to lease from (seq, payload_size) candidates given in drain order.

    Stops at the first free record that would overflow `max_bytes` instead of skipping to smaller ones,
    so order within a priority is kept; the first record is always taken even if it alone exceeds
    `max_bytes`, otherwise an oversized record would block the queue forever."""
    chosen: list[int] = []
    total = 0
    if max_items == 0:
        return chosen
    for seq, size in candidates:
        if not book.is_free(seq, now_s):
            continue
        if max_bytes is not None and chosen and total + size > max_bytes:
            break
        chosen.append(seq)
        total += size
        if len(chosen) >= max_items:
            break
    return chosen
