"""Benchmarks (`edge-hil bench NAME`): each prints progress, then one `bench NAME: key=value ...` line."""

from __future__ import annotations


def result_line(name: str, **values: object) -> str:
    """The one summary line every benchmark ends with: `bench NAME: key=value ...` (floats to 4 digits)."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
    return f"bench {name}: " + " ".join(parts)
