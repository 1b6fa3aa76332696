"""Reconnect delays: jittered exponential backoff and a deterministic per-client spread.

Pure: no clock, no sleeping. The caller asks for the next delay and sleeps it itself; randomness comes
from an injected `random.Random` so tests are reproducible.

Why jitter: after a broker restart a whole fleet loses its link at the same instant. Without jitter
every gateway retries in lock step and the broker sees a synchronized stampede at each backoff step.
"full" jitter (uniform in [0, base]) spreads best; "equal" jitter (base/2 + uniform in [0, base/2])
keeps a guaranteed minimum pause. See the AWS Architecture Blog "Exponential Backoff And Jitter".
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

Jitter = Literal["full", "equal"]


class Backoff:
    """Delays that grow as initial_s * multiplier**attempt, capped at max_s, with jitter.

    Invariant: every delay returned lies in [0, max_s] ("full") or [base/2, base] ("equal") where base
    is the capped exponential for that attempt. `reset()` after a successful connection.
    """

    def __init__(
        self,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        multiplier: float = 2.0,
        jitter: Jitter = "full",
        rng: random.Random | None = None,
    ) -> None:
        if not initial_s > 0:
            raise ValueError(f"initial_s must be > 0, got {initial_s}")
        if max_s < initial_s:
            raise ValueError(f"max_s ({max_s}) must be >= initial_s ({initial_s})")
        if multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {multiplier}")
        if jitter not in ("full", "equal"):
            raise ValueError(f"jitter must be 'full' or 'equal', got {jitter!r}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.multiplier = multiplier
        self.jitter: Jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._base_s = initial_s
        self.attempts = 0

    def base_s(self) -> float:
        """The un-jittered delay the next call to next_delay() will draw from."""
        return self._base_s

    def next_delay(self) -> float:
        """The delay to sleep before the next attempt; advances the exponential."""
        base = self._base_s
        if self.jitter == "full":
            delay = self._rng.uniform(0.0, base)
        else:
            delay = base / 2 + self._rng.uniform(0.0, base / 2)
        self.attempts += 1
        # Grow the base only until the cap: multiplying forever would overflow to inf after ~1000 failures.
        self._base_s = min(self.max_s, base * self.multiplier)
        return delay

    def reset(self) -> None:
        """Start again from initial_s (call after a connection succeeded)."""
        self._base_s = self.initial_s
        self.attempts = 0


def spread_s(client_id: str, window_s: float) -> float:
    """A delay in [0, window_s) fixed for client_id: the same id always gets the same slot.

    Uses SHA-256 rather than `hash()` because str hashes are salted per process; the spread must be
    stable across restarts so that a fleet stays evenly spread after every broker restart.
    """
    if window_s < 0:
        raise ValueError(f"window_s must be >= 0, got {window_s}")
    digest = hashlib.sha256(client_id.encode("utf-8")).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return fraction * window_s
