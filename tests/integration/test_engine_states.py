"""The claim/record state machine on a real PostgreSQL, driven by scripted sinks.

Kafka rarely fails one message and not its neighbours, so retries, parking, dead letters and
fan-out are exercised here with sinks whose answers the test decides. The database, the
engine and every SQL statement are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import psycopg
import pytest
from sqlalchemy import Engine

from relay.backoff import Backoff
from relay.config import Route
from relay.runtime import RouteRuntime
from relay.sinks.base import Delivered, Failed, KeyGate, Outbound, Result
from tests.harness.relay import (
    RelayThread,
    publish_many,
    scalar,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration

Decide = Callable[[int, int], Result]  # (n, attempt) -> result


class ScriptedSink:
    """A one-at-a-time sink answering ``decide(n, attempt)``; remembers what it delivered."""

    def __init__(self, decide: Decide) -> None:
        self.decide = decide
        self.attempts: Counter[int] = Counter()
        self.delivered: list[tuple[str | None, int]] = []

    async def send(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        results: list[Result] = []
        gate = KeyGate()
        for message in batch:
            results.append(gate.check(message) or self._attempt(message))
            gate.record(message, results[-1])
        return results

    def _attempt(self, message: Outbound) -> Result:
        n = json.loads(message.payload)["n"]
        self.attempts[n] += 1
        result = self.decide(n, self.attempts[n])
        if isinstance(result, Delivered):
            self.delivered.append((message.key.decode() if message.key else None, n))
        return result

    def abort(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def order_by_key(self) -> dict[str | None, list[int]]:
        by_key: dict[str | None, list[int]] = defaultdict(list)
        for key, n in self.delivered:
            by_key[key].append(n)
        return by_key


def runtime(name: str, sink: ScriptedSink, max_attempts: int = 5) -> RouteRuntime:
    route = Route(
        name=name, topics=("*",), sink="kafka", max_attempts=max_attempts,
        backoff_initial_s=0.05, backoff_max_s=0.2,
    )  # fmt: skip
    return RouteRuntime(route, sink, Backoff(route.first_backoff, route.max_backoff))


def relay_with(url: str, *runtimes: RouteRuntime, batch_size: int = 50) -> RelayThread:
    settings = settings_for(url, "127.0.0.1:1", batch_size=batch_size, poll_interval=0.05)
    return RelayThread(settings, routes=runtimes)


def ok(_n: int, _attempt: int) -> Result:
    return Delivered()


def test_transient_failure_retries_with_backoff_and_parks_only_its_key(
    url: str, engine: Engine
) -> None:
    def decide(n: int, attempt: int) -> Result:
        return Failed("retry", "flaky", "try later") if n == 3 and attempt < 3 else Delivered()

    sink = ScriptedSink(decide)
    committed = publish_many(engine, "t", 60, keys=3, per_tx=60)
    with relay_with(url, runtime("r", sink)) as relay:
        relay.wait_delivered(60, timeout=30)
    order = sink.order_by_key()
    assert order["k0"] == [n for n in committed if n % 3 == 0], "key k0 (holds n=3) kept order"
    assert order["k1"] == [n for n in committed if n % 3 == 1]
    assert sink.attempts[3] == 3 and sink.attempts[6] == 1, "parked messages are sent once"
    with psycopg.connect(url) as conn:
        attempts = conn.execute(
            "SELECT attempts FROM outbox.delivery WHERE convert_from(payload, 'UTF8') = '{\"n\":3}'"
        ).fetchone()
    assert attempts == (3,)
    assert scalar(url, "SELECT count(*) FROM outbox.route_pending") == 0
    assert scalar(url, "SELECT count(*) FROM outbox.message") == 0


def test_other_keys_are_not_held_back_by_a_retrying_message(url: str, engine: Engine) -> None:
    def decide(n: int, attempt: int) -> Result:
        return Failed("retry", "slow", "") if n == 0 and attempt < 4 else Delivered()

    sink = ScriptedSink(decide)
    route = runtime("r", sink)
    route.backoff = Backoff(1.0, 1.0, jitter=0.0)
    publish_many(engine, "t", 40, keys=4, per_tx=40)
    with relay_with(url, route) as relay:
        relay.wait_delivered(30, timeout=10)
        assert [n for _, n in sink.delivered if n % 4 == 0] == [], "k0 waits behind n=0"
        assert scalar(url, "SELECT count(*) FROM outbox.route_pending") == 10
        relay.wait_delivered(40, timeout=30)
    assert sink.order_by_key()["k0"] == list(range(0, 40, 4))


def test_permanent_failure_dead_letters_without_holding_back_its_key(
    url: str, engine: Engine
) -> None:
    def decide(n: int, _attempt: int) -> Result:
        return Failed("permanent", "rejected", "bad record") if n == 5 else Delivered()

    sink = ScriptedSink(decide)
    publish_many(engine, "t", 20, keys=2, per_tx=20)
    with relay_with(url, runtime("r", sink)) as relay:
        relay.wait_delivered(19)
        wait_until(lambda: relay.engine is not None and relay.engine.stats.dead == 1, 10, "dead")
    assert sink.order_by_key()["k1"] == [1, 3, 7, 9, 11, 13, 15, 17, 19]
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT route, reason, attempts, last_error FROM outbox.dead_letter"
        ).fetchone()
    assert row == ("r", "rejected", 1, "rejected: bad record")


def test_retries_exhausted_become_a_dead_letter(url: str, engine: Engine) -> None:
    sink = ScriptedSink(lambda n, _a: Failed("retry", "HTTP 503", "") if n == 0 else Delivered())
    publish_many(engine, "t", 5, keys=1)
    with relay_with(url, runtime("r", sink, max_attempts=3)) as relay:
        relay.wait_delivered(4, timeout=20)
    assert sink.attempts[0] == 3
    assert sink.order_by_key()["k0"] == [1, 2, 3, 4]
    with psycopg.connect(url) as conn:
        reason, attempts = conn.execute(
            "SELECT reason, attempts FROM outbox.dead_letter"
        ).fetchone()
    assert reason == "max attempts reached (HTTP 503)" and attempts == 3


def test_outage_spends_no_attempts_and_dead_letters_nothing(url: str, engine: Engine) -> None:
    state = {"down": True}

    def decide(_n: int, _attempt: int) -> Result:
        return Failed("unavailable", "_TRANSPORT", "down") if state["down"] else Delivered()

    sink = ScriptedSink(decide)
    publish_many(engine, "t", 30, keys=3)
    # Full batches: the first pass moves past the outage, the route's retries wait for it.
    with relay_with(url, runtime("r", sink, max_attempts=2), batch_size=10) as relay:
        # Three rounds, each trying the first message of each key: more than max_attempts.
        wait_until(lambda: min(sink.attempts[n] for n in range(3)) >= 3, 20, "failed rounds")
        assert scalar(url, "SELECT count(*) FROM outbox.dead_letter") == 0
        spent = "SELECT coalesce(max(attempts), 0) FROM outbox.route_pending"
        assert scalar(url, spent) == 0, "queued for the route, no attempt spent"
        state["down"] = False
        relay.wait_delivered(30, timeout=40)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT DISTINCT attempts FROM outbox.delivery").fetchall() == [(1,)]
    for key, numbers in sink.order_by_key().items():
        assert numbers == sorted(numbers), key


def test_fan_out_failing_route_never_delays_the_other(url: str, engine: Engine) -> None:
    good = ScriptedSink(ok)
    bad = ScriptedSink(lambda n, a: Failed("retry", "flaky", "") if a < 3 else Delivered())
    publish_many(engine, "t", 40, keys=4, per_tx=40)
    with relay_with(url, runtime("good", good), runtime("bad", bad), batch_size=10):
        wait_until(lambda: len(good.delivered) == 40, 10, "the healthy route")
        assert scalar(url, "SELECT count(*) FROM outbox.message WHERE fanned") > 0
        wait_until(lambda: len(bad.delivered) == 40, 40, "the failing route to catch up")
        wait_until(lambda: scalar(url, "SELECT count(*) FROM outbox.message") == 0, 10, "done")
    with psycopg.connect(url) as conn:
        per_route = dict(conn.execute(
            "SELECT route, count(*) FROM outbox.delivery GROUP BY route"
        ).fetchall())  # fmt: skip
    assert per_route == {"good": 40, "bad": 40}
    for sink in (good, bad):
        for key, numbers in sink.order_by_key().items():
            assert numbers == sorted(numbers), key


class SlowSink(ScriptedSink):
    """Delivers everything, but only after ``delay`` seconds per batch."""

    def __init__(self, delay: float) -> None:
        super().__init__(ok)
        self.delay = delay
        self.sends_begun = 0

    async def send(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        self.sends_begun += 1
        await asyncio.sleep(self.delay)
        return await super().send(route, batch)


def test_no_transaction_stays_open_across_a_slow_send(url: str, engine: Engine) -> None:
    """The first pass reads, sends, then records: nothing is held while the sink works."""
    publish_many(engine, "t", 20, keys=2)
    settings = settings_for(url, "127.0.0.1:1", poll_interval=0.05)
    open_tx = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'outbox-relay%%' "
        "AND state LIKE 'idle in transaction%%'"
    )
    sink = SlowSink(2.0)
    with RelayThread(settings, routes=[runtime("r", sink)]) as relay:
        wait_until(lambda: sink.sends_begun == 1, 5, "the first send to begin")
        time.sleep(0.5)  # well inside the 2 s send (the next chunk is read meanwhile)
        assert scalar(url, open_tx) == 0
        assert scalar(url, "SELECT count(*) FROM outbox.message") == 20, "nothing recorded yet"
        relay.wait_delivered(20, timeout=15)
    assert scalar(url, "SELECT count(*) FROM outbox.message") == 0
    assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 20


def test_backlog_through_a_slow_sink_does_not_stall(url: str, engine: Engine) -> None:
    """Every batch slower than hold_seconds (a setting the log first pass no longer needs).

    Regression of the first pass that locked its batch: a prefetched claim could keep the
    rows of a slow batch locked and its record waited 30 s for the idle-in-transaction
    timeout. Kept: a backlog through a slow sink drains in order.
    """
    publish_many(engine, "t", 1000, keys=7, per_tx=500)
    settings = settings_for(url, "127.0.0.1:1", hold_seconds=0.001, batch_size=100)
    sink = SlowSink(0.02)
    with RelayThread(settings, routes=[runtime("r", sink)]) as relay:
        relay.wait_delivered(1000, timeout=20)
    assert len(sink.delivered) == 1000
    for key, numbers in sink.order_by_key().items():
        assert numbers == sorted(numbers), key
