"""From per-(message, route) results to the rows one record transaction writes."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from relay import plan
from relay.plan import Dead, Pending, Verdict, plan_first_pass, plan_retry_pass, verdict
from relay.sinks.base import Delivered, Failed, Outbound

_T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def outbound(
    seq: int, *, topic: str = "orders.created", key: bytes | None = b"k", attempts: int = 0
) -> Outbound:
    return Outbound(
        seq=seq,
        id=uuid.UUID(int=seq),
        topic=topic,
        key=key,
        payload=b"{}",
        content_type="application/json",
        headers=(),
        idempotency_key=None,
        created_at=_T0,
        attempts=attempts,
    )


# --- verdict -----------------------------------------------------------------------------


def test_delivered_is_recorded_as_delivered() -> None:
    result = Delivered(partition=3, offset=99)
    assert verdict(result, prior_attempts=4, max_attempts=5, backoff=1.0, pause=2.0) == result


def test_permanent_failure_is_dead_at_once() -> None:
    result = Failed("permanent", "MSG_SIZE_TOO_LARGE", "too big")
    assert verdict(result, 0, 12, 1.0, 2.0) == Dead(
        1, "MSG_SIZE_TOO_LARGE", "MSG_SIZE_TOO_LARGE: too big", "MSG_SIZE_TOO_LARGE"
    )


def test_unavailable_spends_no_attempt_and_pauses() -> None:
    result = Failed("unavailable", "_TRANSPORT")
    got = verdict(result, prior_attempts=3, max_attempts=4, backoff=8.0, pause=2.5)
    assert got == Pending(
        attempts=3, delay=2.5, error="_TRANSPORT", unavailable=True, status="_TRANSPORT"
    )


def test_retry_counts_an_attempt_and_waits_the_backoff() -> None:
    result = Failed("retry", "http 503", "upstream busy")
    got = verdict(result, prior_attempts=2, max_attempts=12, backoff=8.0, pause=2.5)
    assert got == Pending(attempts=3, delay=8.0, error="http 503: upstream busy", status="http 503")
    assert not got.unavailable


def test_retry_that_reaches_max_attempts_is_dead() -> None:
    result = Failed("retry", "http 503")
    got = verdict(result, prior_attempts=11, max_attempts=12, backoff=8.0, pause=2.5)
    assert got == Dead(12, "max attempts reached (http 503)", "http 503", "http 503")
    # One attempt earlier is still a retry.
    assert isinstance(verdict(result, 10, 12, 8.0, 2.5), Pending)


def test_gone_is_dead_at_once_and_says_the_route_is_disabled() -> None:
    got = verdict(Failed("gone", "HTTP 410", "no such hook"), 2, 12, 8.0, 1.0)
    assert got == Dead(
        3, "endpoint gone (HTTP 410); route disabled", "HTTP 410: no such hook", "HTTP 410"
    )


def test_held_keeps_the_attempts_already_spent() -> None:
    got = verdict(Failed("held", "held"), 4, 12, 8.0, 1.0)
    assert got == Pending(attempts=4, delay=0.0, error=None)


def test_unavailable_never_dead_letters_even_past_max_attempts() -> None:
    got = verdict(Failed("unavailable", "_ALL_BROKERS_DOWN"), 50, 12, 8.0, 1.0)
    assert isinstance(got, Pending) and got.unavailable and got.attempts == 50


# --- first pass --------------------------------------------------------------------------


def test_first_pass_all_delivered_finishes_with_delivery_rows() -> None:
    m1, m2 = outbound(1), outbound(2)
    verdicts: dict[tuple[int, str], Verdict] = {
        (1, "a"): Delivered(0, 10),
        (1, "b"): Delivered(None, None),
        (2, "a"): Delivered(1, 5),
    }
    p = plan_first_pass([m1, m2], verdicts, {1: ["a", "b"], 2: ["a"]})
    assert p.finished == [1, 2]
    assert p.finished_deliveries.columns == {
        "seq": [1, 1, 2],
        "route": ["a", "b", "a"],
        "attempts": [1, 1, 1],
        "partition": [0, None, 1],
        "offset": [10, None, 5],
    }
    assert len(p.finished_dead) == len(p.pending) == len(p.deliveries) == 0
    assert p.fanned == []
    assert (p.delivered_count, p.dead_count) == (3, 0)


def test_first_pass_without_route_is_dead_under_no_route() -> None:
    p = plan_first_pass([outbound(7, topic="stray.topic")], {}, {})
    assert p.finished == [7]
    assert p.finished_dead.columns == {
        "seq": [7],
        "route": [plan.NO_ROUTE],
        "attempts": [0],
        "reason": ["no route"],
        "error": ["no route matches topic 'stray.topic'"],
        "status": [None],
    }
    assert p.dead_count == 1


def test_first_pass_all_routes_unavailable_queues_each_route() -> None:
    """The first pass moves past it: each route retries it on its own, no attempt spent."""
    down = Pending(0, 2.0, "_TRANSPORT", unavailable=True)
    p = plan_first_pass([outbound(1)], {(1, "a"): down, (1, "b"): down}, {1: ["a", "b"]})
    assert p.fanned == [1]
    assert p.finished == []
    assert p.pending.columns["route"] == ["a", "b"]
    assert p.pending.columns["attempts"] == [0, 0]
    for rows in (p.finished_deliveries, p.finished_dead, p.deliveries, p.dead):
        assert len(rows) == 0


def test_first_pass_delivered_and_dead_mix_finishes() -> None:
    verdicts: dict[tuple[int, str], Verdict] = {
        (1, "a"): Delivered(0, 1),
        (1, "b"): Dead(1, "http 410", None),
    }
    p = plan_first_pass([outbound(1)], verdicts, {1: ["a", "b"]})
    assert p.finished == [1]
    assert p.finished_deliveries.columns["route"] == ["a"]
    assert p.finished_dead.columns["route"] == ["b"]
    assert p.finished_dead.columns["reason"] == ["http 410"]


def test_first_pass_delivered_and_retry_fans_out() -> None:
    verdicts: dict[tuple[int, str], Verdict] = {
        (1, "kafka"): Delivered(2, 40),
        (1, "hook"): Pending(1, 5.0, "http 503"),
    }
    m = outbound(1, key=b"7")
    p = plan_first_pass([m], verdicts, {1: ["kafka", "hook"]})
    assert p.fanned == [1]
    assert p.finished == []
    assert p.deliveries.columns == {
        "seq": [1],
        "route": ["kafka"],
        "attempts": [1],
        "partition": [2],
        "offset": [40],
    }
    assert p.pending.columns == {
        "seq": [1],
        "route": ["hook"],
        "topic": ["orders.created"],
        "key": [b"7"],
        "attempts": [1],
        "delay": [dt.timedelta(seconds=5)],
        "error": ["http 503"],
        "status": [None],
    }
    assert (p.delivered_count, p.dead_count) == (1, 0)


def test_first_pass_parked_route_waits_with_no_attempt_spent() -> None:
    verdicts: dict[tuple[int, str], Verdict] = {(1, "a"): Delivered(0, 1), (1, "b"): plan.parked()}
    p = plan_first_pass([outbound(1)], verdicts, {1: ["a", "b"]})
    assert p.fanned == [1]
    assert p.pending.columns["route"] == ["b"]
    assert p.pending.columns["attempts"] == [0]
    assert p.pending.columns["delay"] == [dt.timedelta(0)]
    assert p.pending.columns["error"] == [None]


def test_first_pass_one_route_unavailable_other_delivered_keeps_the_outage_route() -> None:
    verdicts: dict[tuple[int, str], Verdict] = {
        (1, "a"): Delivered(0, 1),
        (1, "b"): Pending(0, 3.0, "down", unavailable=True),
    }
    p = plan_first_pass([outbound(1)], verdicts, {1: ["a", "b"]})
    assert p.fanned == [1]
    assert p.pending.columns["route"] == ["b"]
    assert p.pending.columns["attempts"] == [0]


# --- retry pass --------------------------------------------------------------------------


def test_retry_pass_delivered_counts_the_attempt_and_clears_pending() -> None:
    m = outbound(4, attempts=2)
    p = plan_retry_pass([(m, "hook")], [Delivered()])
    assert p.deliveries.columns == {
        "seq": [4],
        "route": ["hook"],
        "attempts": [3],
        "partition": [None],
        "offset": [None],
    }
    assert p.pending_done.columns == {"seq": [4], "route": ["hook"]}
    assert p.retried_seqs == [4]
    assert len(p.pending) == 0
    assert p.finished == p.fanned == []


def test_retry_pass_dead_writes_a_dead_letter_and_clears_pending() -> None:
    m = outbound(4, attempts=11)
    p = plan_retry_pass([(m, "hook")], [Dead(12, "max attempts reached (http 503)", "x")])
    assert p.dead.columns["attempts"] == [12]
    assert p.pending_done.columns == {"seq": [4], "route": ["hook"]}
    assert p.retried_seqs == [4]
    assert p.dead_count == 1


def test_retry_pass_retry_is_only_a_pending_upsert() -> None:
    m = outbound(4, attempts=2)
    p = plan_retry_pass([(m, "hook")], [Pending(3, 20.0, "http 500")])
    assert p.pending.columns["attempts"] == [3]
    assert p.pending.columns["delay"] == [dt.timedelta(seconds=20)]
    assert len(p.deliveries) == len(p.dead) == len(p.pending_done) == 0
    assert p.retried_seqs == []


def test_retry_pass_needs_one_verdict_per_claimed_row() -> None:
    with pytest.raises(ValueError):
        plan_retry_pass([(outbound(1), "a"), (outbound(2), "a")], [Delivered()])
