"""Human durations and the retry delay schedule."""

from __future__ import annotations

import pytest

from relay.backoff import Backoff
from relay.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * 86400.0),
        ("90s", 90.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("15m", 900.0),
        ("2w", 1_209_600.0),
        ("42", 42.0),
        ("0.5", 0.5),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "7 days", "5x", "-5s", "1e3", "s", "1.s", "1h30m"])
def test_junk_durations_raise_value_error_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration.*7d"):
        parse_duration(text)


def test_delay_without_jitter_doubles_from_initial_and_caps() -> None:
    backoff = Backoff(initial=0.5, maximum=6.0, jitter=0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]


def test_attempt_zero_or_less_waits_the_initial_delay() -> None:
    backoff = Backoff(initial=3.0, maximum=100.0, jitter=0)
    assert backoff.delay(0) == backoff.delay(-2) == 3.0


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    assert Backoff(initial=5.0, maximum=36000.0).delay(10_000) == 36000.0


def test_jitter_is_bounded_and_actually_random() -> None:
    backoff = Backoff(initial=1.0, maximum=1000.0)  # jitter defaults to `initial`
    for attempt, base in ((1, 1.0), (3, 4.0), (6, 32.0)):
        samples = [backoff.delay(attempt) for _ in range(300)]
        assert all(base <= s <= base + 1.0 for s in samples), attempt
        assert max(samples) - min(samples) > 0.5, "jitter should spread the delays"


def test_explicit_jitter_bound_and_cap_with_jitter() -> None:
    backoff = Backoff(initial=2.0, maximum=10.0, jitter=0.25)
    assert all(2.0 <= backoff.delay(1) <= 2.25 for _ in range(200))
    assert {backoff.delay(4) for _ in range(200)} == {10.0}  # 16 + jitter, capped at 10


@pytest.mark.filterwarnings("error")
def test_backoff_uses_no_deprecated_tenacity_api() -> None:
    # tenacity 9.2 deprecated wait_exponential_jitter(initial=...); with filterwarnings=error
    # a Backoff built on it broke every test importing relay.engine.
    assert 0.5 <= Backoff(initial=0.5, maximum=30.0).delay(1) <= 1.0
