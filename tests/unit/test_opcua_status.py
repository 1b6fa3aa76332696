"""StatusCode severity -> quality, the reason carried with it, and the absolute deadband rule."""

from __future__ import annotations

import pytest

from drivers.base import Quality
from drivers.opcua.client import sample_of, status_name
from drivers.opcua.status import exceeds_deadband, quality_of, reason_of


@pytest.mark.parametrize(
    ("code", "quality"),
    [
        (0x00000000, Quality.GOOD),  # Good
        (0x00960000, Quality.GOOD),  # GoodLocalOverride
        (0x40900000, Quality.UNCERTAIN),  # UncertainLastUsableValue
        (0x40950000, Quality.UNCERTAIN),  # UncertainSubNormal
        (0x808C0000, Quality.BAD),  # BadSensorFailure
        (0x80340000, Quality.BAD),  # BadNodeIdUnknown
        (0xC0000000, Quality.BAD),  # reserved severity 11: not trustworthy
    ],
)
def test_the_severity_bits_decide_the_quality(code: int, quality: Quality) -> None:
    assert quality_of(code) is quality


def test_plain_good_has_no_reason_and_everything_else_carries_its_name() -> None:
    assert reason_of(0, "Good") is None
    assert reason_of(0x00000400, "Good") is None  # info bits only (overflow): still plain Good
    assert reason_of(0x808C0000, status_name(0x808C0000)) == "BadSensorFailure"
    assert reason_of(0x40900000, status_name(0x40900000)) == "UncertainLastUsableValue"
    assert reason_of(0x00960000, status_name(0x00960000)) == "GoodLocalOverride"


def test_status_names_ignore_the_limit_and_overflow_info_bits() -> None:
    assert status_name(0x40900000 | 0x0100) == "UncertainLastUsableValue"  # limit low


@pytest.mark.parametrize(
    ("last", "value", "report"),
    [
        (10.0, 10.5, False),  # |0.5| is not > 0.5
        (10.0, 10.51, True),
        (10.0, 9.4, True),
        (10, 10, False),
        (True, False, True),  # booleans flip, they are not numbers
        (True, True, False),
        ("run", "stop", True),
        (None, 1.0, True),  # first good value after a BAD one
        (1.0, None, True),
    ],
)
def test_the_deadband_reports_only_changes_larger_than_it(last: object, value: object, report: bool) -> None:
    assert exceeds_deadband(last, value, 0.5) is report  # type: ignore[arg-type]


def test_a_data_value_becomes_a_sample_with_the_source_timestamp_in_ns() -> None:
    import datetime as dt

    from asyncua import ua

    ts = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
    dv = ua.DataValue(Value=ua.Variant(2.5, ua.VariantType.Double))
    dv.SourceTimestamp = ts  # type: ignore[assignment]
    sample = sample_of(dv)
    assert sample.value == 2.5 and sample.status_code == 0
    assert sample.source_ts_ns == 1714564800_123456000


def test_a_value_type_we_cannot_represent_is_bad_with_a_reason() -> None:
    from asyncua import ua

    dv = ua.DataValue(Value=ua.Variant([1, 2, 3], ua.VariantType.Int32))
    sample = sample_of(dv)
    assert quality_of(sample.status_code) is Quality.BAD
    assert sample.value is None and "unsupported value type" in sample.status_name
