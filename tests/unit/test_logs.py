"""What librdkafka logs reaches the relay's log without its repetitions."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from relay.logs import RepeatQuieter

FORMAT = "%s [%s] %s"  # how librdkafka's client calls logger.log
NAME = "rdkafka#producer-1"


Log = Callable[[float, int, str], None]


@pytest.fixture
def at(caplog: pytest.LogCaptureFixture) -> Log:
    """``at(when, level, text)``: librdkafka logs ``text`` at ``when`` seconds."""
    caplog.set_level(logging.DEBUG, logger="test.librdkafka")
    now = [0.0]
    quieter = RepeatQuieter(logging.getLogger("test.librdkafka"), 60.0, lambda: now[0])

    def log(when: float, level: int, text: str) -> None:
        now[0] = when
        quieter.log(level, FORMAT, "FAIL", NAME, text)

    return log


def shown(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_a_lasting_failure_is_one_line_a_minute_saying_how_many_were_left_out(
    at: Log, caplog: pytest.LogCaptureFixture
) -> None:
    for step in range(120):  # two a second for a minute, the numbers in them varying
        at(step * 0.5, logging.ERROR, f"127.0.0.1:1/bootstrap: refused (after {step}ms)")
    at(61.0, logging.ERROR, "127.0.0.1:1/bootstrap: refused (after 7ms)")

    assert shown(caplog) == [
        f"FAIL [{NAME}] 127.0.0.1:1/bootstrap: refused (after 0ms)",
        f"FAIL [{NAME}] 127.0.0.1:1/bootstrap: refused (after 7ms) "
        "(119 more like it in the last 61 s)",
    ]


def test_another_kind_of_line_shows_at_once(at: Log, caplog: pytest.LogCaptureFixture) -> None:
    at(0.0, logging.ERROR, "b1: refused")
    at(0.1, logging.ERROR, "b1: refused")
    at(0.2, logging.INFO, "b1: refused")  # another level is another kind
    at(0.3, logging.ERROR, "b1: connected")
    at(0.4, logging.ERROR, "b1: refused")

    assert shown(caplog) == [
        f"FAIL [{NAME}] b1: refused",
        f"FAIL [{NAME}] b1: refused",
        f"FAIL [{NAME}] b1: connected",
    ]
