"""Times given to operator commands: a duration ago or an ISO-8601 time."""

from __future__ import annotations

import datetime as dt

import pytest

from relay.moments import local_time, parse_positive_duration, parse_when

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("15m", dt.timedelta(minutes=15)),
        ("7d", dt.timedelta(days=7)),
        ("90", dt.timedelta(seconds=90)),
        ("0s", dt.timedelta(0)),
        (" 2h ", dt.timedelta(hours=2)),
    ],
)
def test_a_duration_means_that_long_ago(text: str, ago: dt.timedelta) -> None:
    assert parse_when(text) == ago
    assert local_time(parse_when(text), NOW) == NOW - ago


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-11-20T12:00:00Z", dt.datetime(2026, 11, 20, 12, tzinfo=dt.UTC)),
        ("2026-11-20 12:00:00+02:00", dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC)),
    ],
)
def test_an_iso_time_is_that_time(text: str, moment: dt.datetime) -> None:
    assert parse_when(text) == moment
    assert local_time(parse_when(text), NOW) == moment


def test_an_iso_time_without_offset_is_local_time() -> None:
    parsed = parse_when("2026-11-20")
    assert isinstance(parsed, dt.datetime)
    assert parsed.tzinfo is not None
    assert parsed.replace(tzinfo=None) == dt.datetime(2026, 11, 20)


@pytest.mark.parametrize("text", ["yesterday", "", "-5m", "5 parsecs", "2026-13-01"])
def test_neither_a_duration_nor_a_time(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_when(text)


def test_positive_durations() -> None:
    assert parse_positive_duration("7d") == dt.timedelta(days=7)
    assert parse_positive_duration("500ms") == dt.timedelta(milliseconds=500)
    for text in ("0", "0d", "0.0s"):
        with pytest.raises(ValueError, match="more than zero"):
            parse_positive_duration(text)
    with pytest.raises(ValueError, match="not a duration"):
        parse_positive_duration("week")
