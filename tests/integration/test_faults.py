"""Fault injection with a ledger: kill the relay, pause the broker, cut and restart Postgres.

Every test checks what arrived against what committed: nothing lost, nothing rolled back
delivered, per-key order of first appearances kept. Duplicates are counted and bounded.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox_lib
from tests.harness.kafka import Record, consume_until, create_topic
from tests.harness.relay import (
    RelayProcess,
    RelayThread,
    publish_many,
    scalar,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration

# A killed relay's key buckets move after its bucket lease (10 s by default).
FAST_TAKEOVER = {"OUTBOX_BUCKET_LEASE_SECONDS": "3", "OUTBOX_HEARTBEAT_SECONDS": "0.5"}


def read_topic(bootstrap: str, topic: str, at_least: int, timeout: float = 60.0) -> list[Record]:
    """Everything on the topic once ``at_least`` distinct messages arrived, duplicates too."""

    def enough(records: list[Record]) -> bool:
        return len({json.loads(r.value)["n"] for r in records}) >= at_least

    return consume_until(bootstrap, topic, enough, timeout=timeout)


def check_ledger(
    records: list[Record], committed: list[int], url: str | None = None
) -> dict[str, int]:
    """Lost must be empty and per-key first appearances in order; returns the figures.

    With ``url``, a loss report says what ``delivery`` recorded for the lost messages.
    """
    first_seen: dict[bytes | None, list[int]] = defaultdict(list)
    seen: set[int] = set()
    duplicates = 0
    for record in records:
        n = json.loads(record.value)["n"]
        if n in seen:
            duplicates += 1
            continue
        seen.add(n)
        first_seen[record.key].append(n)
    lost = set(committed) - seen
    phantom = seen - set(committed)
    assert not lost, f"lost {len(lost)} messages, e.g. {sorted(lost)[:5]}" + (
        f"; delivery log: {recorded_as(url, sorted(lost)[:5])}" if url else ""
    )
    assert not phantom, f"delivered {len(phantom)} rolled-back messages"
    inversions = sum(
        1
        for key, ns in first_seen.items()
        if key is not None  # keyless messages carry no order promise
        for a, b in itertools.pairwise(ns)
        if a > b
    )
    assert inversions == 0, f"{inversions} per-key inversions"
    return {"delivered": len(seen), "duplicates": duplicates}


def recorded_as(url: str, ns: list[int]) -> list[tuple[int, int, int]]:
    """(n, partition, offset) that ``delivery`` holds for these messages."""
    rows = scalar(
        url,
        "SELECT json_agg(json_build_array((convert_from(payload, 'UTF8')::jsonb->>'n')::int,"
        " kafka_partition, kafka_offset)) FROM outbox.delivery"
        " WHERE (convert_from(payload, 'UTF8')::jsonb->>'n')::int = ANY(%s)",
        (ns,),
    )
    return [tuple(r) for r in rows or []]


def test_relay_sigkilled_mid_backlog_then_restarted_loses_nothing(
    url: str, engine: Engine, kafka, topic_name: str, tmp_path: Path
) -> None:
    create_topic(kafka.bootstrap, topic_name, partitions=3)
    committed = publish_many(engine, topic_name, 20_000, keys=50, per_tx=500)
    log = tmp_path / "relay.log"
    env = {"OUTBOX_BATCH_SIZE": "500", "OUTBOX_LEASE_SECONDS": "3", **FAST_TAKEOVER}
    kills = 0
    for _ in range(3):
        relay = RelayProcess(url, kafka.bootstrap, log, **env).wait_started()
        remaining = scalar(url, "SELECT count(*) FROM outbox.message")
        wait_until(
            lambda r=remaining: scalar(url, "SELECT count(*) FROM outbox.message") < r - 2000,
            30, "progress before the kill",
        )  # fmt: skip
        relay.kill()
        kills += 1
    survivor = RelayProcess(url, kafka.bootstrap, log, **env).wait_started()
    wait_until(lambda: scalar(url, "SELECT count(*) FROM outbox.message") == 0, 60, "drain")
    assert survivor.terminate() == 0
    records = read_topic(kafka.bootstrap, topic_name, len(committed))
    figures = check_ledger(records, committed)
    print(f"sigkill: {kills} kills, {figures}")
    assert figures["duplicates"] <= kills * 2 * 500, "duplicates bounded by in-flight batches"


def test_broker_paused_past_the_producer_timeout_loses_and_dead_letters_nothing(
    url: str, engine: Engine, kafka_broker, topic_name: str, tmp_config
) -> None:
    config = tmp_config(
        f"""
[kafka]
bootstrap_servers = "{kafka_broker.bootstrap}"
[kafka.producer]
"message.timeout.ms" = 1500
"""
    )
    first = publish_many(engine, topic_name, 200, keys=7)
    # Batches of 50: the next batch is prefetched while the outage releases this one.
    with RelayThread(settings_for(url, None, config=str(config), batch_size=50)) as relay:
        relay.wait_delivered(200)
        with kafka_broker.paused():
            during = [
                n for start in range(200, 500, 30)
                for n in _publish_offset(engine, topic_name, start, 30, 7)
            ]  # fmt: skip
            time.sleep(6)  # four times the producer's whole retry budget
            assert relay.delivered == 200
            assert scalar(url, "SELECT count(*) FROM outbox.dead_letter") == 0
            assert scalar(url, "SELECT coalesce(max(attempts), 0) FROM outbox.route_pending") == 0
        relay.wait_delivered(500, timeout=60)
    records = read_topic(kafka_broker.bootstrap, topic_name, 500)
    figures = check_ledger(records, first + during)
    print(f"broker pause: {figures}")
    assert scalar(url, "SELECT count(*) FROM outbox.dead_letter") == 0
    assert scalar(url, "SELECT count(*) FROM outbox.message") == 0


def _publish_offset(engine: Engine, topic: str, start: int, count: int, keys: int) -> list[int]:
    with Session(engine) as session, session.begin():
        for n in range(start, start + count):
            outbox_lib.publish(session, topic, {"n": n}, key=f"k{n % keys}")
    return list(range(start, start + count))


def test_relay_connections_terminated_then_recovered(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    committed = _publish_offset(engine, topic_name, 0, 500, 9)
    relay_backends = (
        "FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname = current_database() "
        "AND (application_name LIKE 'outbox-relay%%' OR query LIKE 'LISTEN%%')"
    )
    with RelayThread(settings_for(url, kafka.bootstrap, batch_size=100)) as relay:
        relay.wait_delivered(500)
        for round_ in range(1, 4):
            wait_until(
                lambda: scalar(url, f"SELECT count(*) {relay_backends}") >= 2,
                20,
                "relay connections (pool and listener) to be back",
            )
            assert scalar(url, f"SELECT count(pg_terminate_backend(pid)) {relay_backends}") >= 2
            committed += _publish_offset(engine, topic_name, 500 * round_, 500, 9)
            relay.wait_delivered(500 * (round_ + 1), timeout=60)
    records = read_topic(kafka.bootstrap, topic_name, 2000)
    check_ledger(records, committed)


def test_postgres_restart_while_relaying(
    url: str, engine: Engine, kafka, topic_name: str, pg_server
) -> None:
    if pg_server.kind != "embedded":
        pytest.skip("restarting needs the embedded server")
    committed = _publish_offset(engine, topic_name, 0, 300, 5)
    with RelayThread(settings_for(url, kafka.bootstrap)) as relay:
        relay.wait_delivered(300)
        pg_server.restart(downtime=2.0)
        engine.dispose()
        committed += _publish_offset(engine, topic_name, 300, 300, 5)
        relay.wait_delivered(600, timeout=60)
    check_ledger(read_topic(kafka.bootstrap, topic_name, 600), committed)


def test_sequence_gap_slow_writers_and_rollbacks(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    """Writers hold their transaction open after INSERT; ids commit out of order."""
    committed: list[int] = []
    lock = threading.Lock()

    def writer(worker: int) -> None:
        rng = random.Random(worker)
        for i in range(25):
            n = worker * 1000 + i
            with Session(engine) as session:
                outbox_lib.publish(session, topic_name, {"n": n}, key=f"w{worker}")
                time.sleep(rng.uniform(0, 0.05))
                if rng.random() < 0.2:
                    session.rollback()
                    continue
                session.commit()
            with lock:
                committed.append(n)

    with RelayThread(settings_for(url, kafka.bootstrap, batch_size=10)) as relay:
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        relay.wait_delivered(len(committed), timeout=60)
        records = read_topic(kafka.bootstrap, topic_name, len(committed))
    # The writers' generators are seeded: these 159 of the 200 commit, every run.
    assert len(committed) == 159
    figures = check_ledger(records, committed)
    print(f"sequence gap: {len(committed)} committed, {figures}")
    assert figures["duplicates"] == 0


def test_sigterm_with_backlog_exits_zero_and_releases_claims(
    url: str, engine: Engine, kafka, topic_name: str, tmp_path: Path
) -> None:
    """Leases a stopped relay kept would block others for 10 minutes: SIGTERM hands them back."""
    committed = publish_many(engine, topic_name, 5000, keys=10, per_tx=500)
    relay = RelayProcess(
        url, kafka.bootstrap, tmp_path / "r.log",
        OUTBOX_BATCH_SIZE="200", OUTBOX_HOLD_SECONDS="1ms", OUTBOX_LEASE_SECONDS="600",
    )  # fmt: skip
    relay.wait_started()
    wait_until(lambda: scalar(url, "SELECT count(*) FROM outbox.message") < 4000, 20, "progress")
    assert relay.terminate() == 0
    left = scalar(url, "SELECT count(*) FROM outbox.message")
    assert left > 0, "stopped mid-backlog"
    assert scalar(url, "SELECT count(*) FROM outbox.bucket_lease WHERE holder IS NOT NULL") == 0
    assert scalar(url, "SELECT count(*) FROM outbox.route_pending WHERE claimed_until > now()") == 0
    with RelayThread(settings_for(url, kafka.bootstrap)) as successor:
        successor.wait_delivered(left, timeout=30)
    check_ledger(read_topic(kafka.bootstrap, topic_name, len(committed)), committed)
