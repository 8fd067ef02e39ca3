"""Several relays on one database: bucket leases, handoffs, takeover, per-key order.

Every test checks a ledger of what arrived on the real broker against what committed:
nothing lost, per-key first appearances in publish order; duplicates are counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from relay.backoff import Backoff
from relay.config import Route
from relay.runtime import RouteRuntime
from relay.sinks.base import Failed, Outbound, Result, Sink
from relay.sinks.kafka import KafkaSink
from tests.harness.kafka import create_topic
from tests.harness.relay import (
    RelayProcess,
    RelayThread,
    publish_many,
    scalar,
    settings_for,
    wait_until,
)
from tests.integration.test_faults import check_ledger, read_topic

pytestmark = pytest.mark.integration

# Short leases so a test sees several takeovers; the defaults are 10 s and 2 s.
FAST = {"bucket_lease_seconds": 3.0, "heartbeat_seconds": 0.5}
FAST_ENV = {
    "OUTBOX_BUCKET_LEASE_SECONDS": "3",
    "OUTBOX_HEARTBEAT_SECONDS": "0.5",
    "OUTBOX_LEASE_SECONDS": "3",
    "OUTBOX_BATCH_SIZE": "500",
}


def holders(url: str) -> dict[str, int]:
    """Live buckets per holder, counting only settled ones (no handoff pending)."""
    rows = scalar(
        url,
        "SELECT coalesce(json_object_agg(holder, n), '{}') FROM ("
        " SELECT holder, count(*) AS n FROM outbox.bucket_lease b"
        " JOIN outbox.relay r ON r.relay_id = b.holder"
        " WHERE r.expires_at > now() AND b.successor IS NULL GROUP BY holder) s",
    )
    return {str(k): int(v) for k, v in rows.items()}


def even_over(url: str, relays: int) -> Callable[[], bool]:
    def check() -> bool:
        counts = holders(url)
        return (
            len(counts) == relays
            and sum(counts.values()) == 256
            and max(counts.values()) - min(counts.values()) <= 1
        )

    return check


def longest_delivery_gap(url: str) -> float:
    """Longest time between two consecutive deliveries (publishing never paused)."""
    return float(
        scalar(
            url,
            "SELECT coalesce(max(extract(epoch FROM gap)), 0) FROM (SELECT delivered_at"
            " - lag(delivered_at) OVER (ORDER BY delivered_at) AS gap FROM outbox.delivery) d",
        )
    )


def pending(url: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM outbox.message"))


class Publisher(threading.Thread):
    """Publishes ``total`` messages on ``keys`` keys at about ``rate`` per second."""

    def __init__(
        self, engine: Engine, topic: str, total: int, keys: int, rate: float, offset: int = 0
    ) -> None:
        super().__init__(daemon=True)
        self.engine, self.topic, self.total, self.keys, self.rate = engine, topic, total, keys, rate
        self.offset = offset
        self.committed: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        chunk = 100
        started = time.monotonic()
        try:
            for start in range(0, self.total, chunk):
                count = min(chunk, self.total - start)
                self.committed += publish_many(
                    self.engine, self.topic, count, keys=self.keys,
                    payload_offset=self.offset + start,
                )  # fmt: skip
                ahead = (start + count) / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self, timeout: float = 120.0) -> list[int]:
        self.join(timeout)
        if self.error:
            raise self.error
        assert not self.is_alive(), "publisher did not finish"
        return self.committed


def test_three_relays_sigkilled_every_1_5_seconds_lose_nothing_and_keep_key_order(
    url: str, engine: Engine, kafka, topic_name: str, tmp_path: Path
) -> None:
    create_topic(kafka.bootstrap, topic_name, partitions=6)
    # A backlog first, so kills land mid-batch; then publishing continues throughout.
    backlog = publish_many(engine, topic_name, 10_000, keys=300, per_tx=500)
    publisher = Publisher(engine, topic_name, 20_000, keys=300, rate=2_000, offset=10_000)
    incarnation = 0

    def start() -> RelayProcess:
        nonlocal incarnation
        incarnation += 1
        log = tmp_path / f"relay-{incarnation}.log"
        return RelayProcess(url, kafka.bootstrap, log, **FAST_ENV).wait_started()

    relays = [start() for _ in range(3)]
    try:
        publisher.start()
        kills = 0
        while publisher.is_alive() or kills < 8:
            time.sleep(1.5)
            victim = kills % 3
            relays[victim].kill()
            kills += 1
            relays[victim] = start()
        committed = backlog + publisher.finish()
        wait_until(lambda: pending(url) == 0, 90, "the three relays to drain the outbox")
        wait_until(even_over(url, 3), 15, "the survivors to share the buckets evenly")
        for relay in relays:
            assert relay.terminate() == 0
    finally:
        for relay in relays:
            relay.stop_quietly()
    records = read_topic(kafka.bootstrap, topic_name, len(committed), timeout=90)
    figures = check_ledger(records, committed, url)
    print(f"\nthree relays, {kills} SIGKILLs, {len(committed)} messages on 300 keys: {figures}")
    assert figures["delivered"] == 30_000


def test_relays_joining_and_leaving_rebalance_evenly_without_duplicates(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    create_topic(kafka.bootstrap, topic_name, partitions=3)
    settings = settings_for(url, kafka.bootstrap, batch_size=200, **FAST)
    publisher = Publisher(engine, topic_name, 12_000, keys=300, rate=1_000)
    first = RelayThread(settings).__enter__()
    wait_until(lambda: holders(url) == {_relay_id(first): 256}, 10, "one relay holding all")
    publisher.start()
    time.sleep(1.5)
    second, third = RelayThread(settings).__enter__(), RelayThread(settings).__enter__()
    wait_until(even_over(url, 3), 15, "an even spread over three relays")
    spread_of_three = sorted(holders(url).values())
    time.sleep(1.5)
    second.stop()
    wait_until(even_over(url, 2), 15, "an even spread over the two remaining relays")
    spread_of_two = sorted(holders(url).values())
    committed = publisher.finish()
    wait_until(lambda: pending(url) == 0, 60, "drain")
    gap = longest_delivery_gap(url)
    delivered = [r.delivered for r in (first, second, third)]
    first.stop()
    third.stop()
    records = read_topic(kafka.bootstrap, topic_name, len(committed))
    figures = check_ledger(records, committed)
    print(
        f"\nrebalance: spreads {spread_of_three} then {spread_of_two}; per relay {delivered}; "
        f"longest pause in deliveries {gap:.2f} s"
    )
    assert spread_of_three == [85, 85, 86]
    assert spread_of_two == [128, 128]
    assert sum(delivered) == len(committed), "nothing recorded twice"
    assert figures["duplicates"] == 0, "a graceful handoff must never deliver twice"
    assert gap < 3.0, "joining and leaving must not pause the other relays"


class WrappedSink:
    """A real sink with a twist in ``send``; aborting and closing go to the real one."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner

    def abort(self) -> None:
        self.inner.abort()

    async def close(self) -> None:
        await self.inner.close()


class DelayedSink(WrappedSink):
    """A real Kafka sink that puts every batch on the wire ``delay`` seconds late."""

    def __init__(self, inner: Sink, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def send(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        await asyncio.sleep(self.delay)
        return await self.inner.send(route, batch)


def test_a_handoff_waits_for_the_holders_batch_in_flight(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    """The holder's batches are slow, so a handoff is always requested mid-send: the
    successor must not claim those keys until the holder has recorded its batch."""
    create_topic(kafka.bootstrap, topic_name, partitions=3)
    settings = settings_for(url, kafka.bootstrap, batch_size=300, **FAST)
    route = Route(name="kafka", topics=("*",), sink="kafka")
    slow = DelayedSink(KafkaSink(settings.producer_config()), delay=0.4)
    runtime = RouteRuntime(route, slow, Backoff(route.first_backoff, route.max_backoff))
    committed = publish_many(engine, topic_name, 6000, keys=300, per_tx=500)
    with RelayThread(settings, routes=[runtime]) as holder:
        wait_until(lambda: holder.delivered >= 300, 15, "the slow holder to be mid-backlog")
        with RelayThread(settings) as successor:
            wait_until(even_over(url, 2), 15, "the handoff to complete")
            wait_until(lambda: pending(url) == 0, 60, "drain")
            shares = [holder.delivered, successor.delivered]
    figures = check_ledger(read_topic(kafka.bootstrap, topic_name, len(committed)), committed)
    print(f"\nhandoff from a slow holder: split {shares}, {figures}")
    assert sum(shares) == len(committed)
    assert figures["duplicates"] == 0


def test_a_sigkilled_relays_buckets_are_taken_over_after_its_lease(
    url: str, engine: Engine, kafka, topic_name: str, tmp_path: Path
) -> None:
    env = {**FAST_ENV, "OUTBOX_BUCKET_LEASE_SECONDS": "3"}
    a = RelayProcess(url, kafka.bootstrap, tmp_path / "a.log", **env).wait_started()
    b = RelayProcess(url, kafka.bootstrap, tmp_path / "b.log", **env).wait_started()
    wait_until(even_over(url, 2), 15, "two relays sharing the buckets")
    a.kill()
    killed_at = time.monotonic()
    committed = publish_many(engine, topic_name, 600, keys=60)
    wait_until(lambda: len(holders(url)) == 1 and pending(url) == 0, 20, "takeover and drain")
    takeover = time.monotonic() - killed_at
    assert b.terminate() == 0
    check_ledger(read_topic(kafka.bootstrap, topic_name, len(committed)), committed)
    print(f"\ntakeover after SIGKILL with a 3 s bucket lease: {takeover:.1f} s")
    assert takeover >= 2.0, "buckets must not move before the dead relay's lease expires"


def bucket_of(key: str) -> int:
    return hashlib.sha256(key.encode()).digest()[0]


class PoisonSink(WrappedSink):
    """A real Kafka sink, except that one key's messages fail (retryably) until healed."""

    def __init__(self, inner: Sink, poison: bytes) -> None:
        super().__init__(inner)
        self.poison, self.healed, self.refused = poison, False, 0

    async def send(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        results: dict[int, Result] = {}
        clean = []
        for message in batch:
            if message.key == self.poison and not self.healed:
                self.refused += 1
                results[message.seq] = Failed("retry", "poisoned", "this key always fails")
            else:
                clean.append(message)
        for message, result in zip(clean, await self.inner.send(route, clean), strict=True):
            results[message.seq] = result
        return [results[m.seq] for m in batch]


def test_a_poison_key_holds_back_only_itself_not_its_bucket(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    poison = "k-poison"
    neighbours = [k for k in (f"k{i}" for i in range(5000)) if bucket_of(k) == bucket_of(poison)]
    assert len(neighbours) >= 5
    settings = settings_for(url, kafka.bootstrap, **FAST)
    route = Route(name="kafka", topics=("*",), sink="kafka", backoff_initial_s=0.2,
                  backoff_max_s=0.5, max_attempts=10_000)  # fmt: skip
    sink = PoisonSink(KafkaSink(settings.producer_config()), poison.encode())
    runtime = RouteRuntime(route, sink, Backoff(route.first_backoff, route.max_backoff))
    with RelayThread(settings, routes=[runtime]), RelayThread(settings):
        wait_until(even_over(url, 2), 15, "two relays sharing the buckets")
        keys = [poison, *neighbours[:5]]
        committed = _publish_keys(engine, topic_name, keys, rounds=20)
        neighbour_ns = [n for n in committed if keys[n % len(keys)] != poison]
        wait_until(
            lambda: _delivered_count(url, topic_name) >= len(neighbour_ns), 20,
            "every neighbour of the poison key in its bucket",
        )  # fmt: skip
        stuck = scalar(url, "SELECT count(*) FROM outbox.message WHERE msg_key = %s",
                       (poison.encode(),))  # fmt: skip
        assert stuck == 20, "the poison key's messages stay queued in order"
        sink.healed = True
        wait_until(lambda: pending(url) == 0, 30, "the healed key to drain")
    records = read_topic(kafka.bootstrap, topic_name, len(committed))
    check_ledger(records, committed)


def _delivered_count(url: str, topic: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM outbox.delivery WHERE topic = %s", (topic,)))


def _publish_keys(engine: Engine, topic: str, keys: list[str], rounds: int) -> list[int]:
    from sqlalchemy.orm import Session

    import outbox_lib

    committed = []
    with Session(engine) as session:
        for n in range(rounds * len(keys)):
            outbox_lib.publish(session, topic, {"n": n}, key=keys[n % len(keys)])
            committed.append(n)
        session.commit()
    return committed


def test_bucket_leases_survive_a_postgres_restart(
    url: str, engine: Engine, kafka, topic_name: str, pg_server: Any
) -> None:
    if pg_server.kind != "embedded":
        pytest.skip("restarting needs the embedded server")
    settings = settings_for(url, kafka.bootstrap, bucket_lease_seconds=10.0, heartbeat_seconds=1.0)
    committed = publish_many(engine, topic_name, 300, keys=30)
    with RelayThread(settings) as a, RelayThread(settings) as b:
        wait_until(even_over(url, 2), 15, "two relays sharing the buckets")
        wait_until(lambda: pending(url) == 0, 20, "drain before the restart")
        before = _lease_table(url)
        pg_server.restart(downtime=2.0)
        engine.dispose()
        committed += publish_many(engine, topic_name, 300, keys=30, payload_offset=300)
        wait_until(lambda: pending(url) == 0, 60, "drain after the restart")
        after = _lease_table(url)
        assert a.error is None and b.error is None
    assert after == before, "the same relays hold the same buckets, with no move in between"
    check_ledger(read_topic(kafka.bootstrap, topic_name, len(committed)), committed)


def _lease_table(url: str) -> list[tuple[int, str, int]]:
    rows = scalar(
        url,
        "SELECT json_agg(json_build_array(bucket, holder, epoch) ORDER BY bucket)"
        " FROM outbox.bucket_lease",
    )
    return [tuple(row) for row in rows]


def _relay_id(relay: RelayThread) -> str:
    assert relay.engine is not None
    return relay.engine.membership.relay_id


def test_status_lists_the_live_relays_and_their_buckets(url: str, kafka) -> None:
    def status(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "relay.cli", "status", *args, "--database-url", url]
        env = {**os.environ, "COLUMNS": "200"}
        return subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False, env=env
        )

    settings = settings_for(url, kafka.bootstrap, **FAST)
    with RelayThread(settings) as a, RelayThread(settings) as b:
        wait_until(even_over(url, 2), 15, "two relays sharing the buckets")
        as_json, as_table = status("--json"), status()
        ids = {_relay_id(a), _relay_id(b)}
    assert as_json.returncode == 0, as_json.stderr
    relays = json.loads(as_json.stdout)["relays"]
    assert {r["id"] for r in relays} == ids
    assert sorted(len(r["buckets"]) for r in relays) == [128, 128]
    assert sorted(b for r in relays for b in r["buckets"]) == list(range(256))
    for r in relays:
        assert set(r) >= {"id", "host", "pid", "buckets", "last_heartbeat"}
    assert as_table.returncode == 0, as_table.stderr
    for relay_id in ids:
        [line] = [line for line in as_table.stdout.splitlines() if relay_id in line]
        assert " 128 " in line


def _leader(url: str) -> str | None:
    holder = scalar(url, "SELECT holder FROM outbox.bucket_lease WHERE bucket = 0")
    return None if holder is None else str(holder)


def test_the_holder_of_bucket_0_reads_the_first_pass_and_hands_it_on(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    """One cursor, one reader: the holder of bucket 0. When it leaves, the relay that gets
    bucket 0 reads on from where it stopped: nothing twice, nothing lost."""
    settings = settings_for(url, kafka.bootstrap, batch_size=100, **FAST)
    a, b = RelayThread(settings).__enter__(), RelayThread(settings).__enter__()
    try:
        wait_until(even_over(url, 2), 15, "two relays sharing the buckets")
        committed = publish_many(engine, topic_name, 5000, per_tx=5000)
        wait_until(lambda: pending(url) == 0, 30, "drain")
        leader, other = (a, b) if _leader(url) == _relay_id(a) else (b, a)
        assert _leader(url) == _relay_id(leader)
        time.sleep(0.3)  # a relay counts a batch just after committing it
        assert (leader.delivered, other.delivered) == (5000, 0)
        leader.stop()
        wait_until(lambda: _leader(url) == _relay_id(other), 15, "bucket 0 to move")
        committed += publish_many(engine, topic_name, 3000, per_tx=1000)
        wait_until(lambda: pending(url) == 0, 30, "drain by the new reader")
    finally:
        a.stop()
        b.stop()
    check_ledger(read_topic(kafka.bootstrap, topic_name, len(committed)), committed)
    print(f"\nfirst pass read by the holder of bucket 0: {[leader.delivered, other.delivered]}")
    assert other.delivered == 3000
    assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 8000
