"""Map OPC UA StatusCodes (Part 4 §7.39) to reading quality, and apply the absolute deadband.

A StatusCode is 32 bits: bits 31..30 are the severity (00 Good, 01 Uncertain, 10 Bad, 11 reserved and
treated as Bad), bits 29..16 the sub-code, the low 16 bits info flags (limit, overflow) that qualify
but do not change the meaning. The reason carried with a reading is the symbolic name of the code
without its info bits, e.g. "UncertainLastUsableValue" or "BadSensorFailure"; plain Good has none.
"""

from __future__ import annotations

from drivers.base import Quality, Value

CODE_MASK = 0xFFFF0000


def quality_of(status_code: int) -> Quality:
    """Quality from the severity bits of a StatusCode."""
    severity = (status_code >> 30) & 0b11
    if severity == 0:
        return Quality.GOOD
    if severity == 1:
        return Quality.UNCERTAIN
    return Quality.BAD


def reason_of(status_code: int, name: str) -> str | None:
    """The reason to carry with a reading: None for plain Good, else the code's name."""
    if status_code & CODE_MASK == 0:
        return None
    return name


def exceeds_deadband(last: Value, value: Value, deadband_abs: float) -> bool:
    """True when `value` must be reported given the last reported value (OPC UA Part 8 §6.2 semantics).

    Numbers are reported when |value - last| > deadband_abs; other types whenever they differ.
    Booleans are not numbers here: a flip is always a change.
    """
    numeric = (int, float)
    if (
        isinstance(last, numeric)
        and isinstance(value, numeric)
        and not isinstance(last, bool)
        and not isinstance(value, bool)
    ):
        return abs(value - last) > deadband_abs
    return last != value
