"""The delivery log written a batch at a time (schema version 10): what the relay records, the
view that keeps version 9's table, and the upgrade and downgrade with records in the log."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
import pytest

import outbox_lib
import outbox_lib.alembic
from relay.purge import Cutoffs, purge
from relay.sinks.base import Delivered, Failed, Result
from tests.harness.relay import scalar
from tests.integration.pg_helpers import fetch, sync_engine
from tests.integration.test_engine_states import ScriptedSink, ok, relay_with, runtime
from tests.integration.test_log_first_pass import _each_once_in_key_order

pytestmark = pytest.mark.integration

KEYS = 5
COUNT = 60
COLUMNS = (
    "message_id, seq, route, topic, msg_key, payload, content_type, headers, idempotency_key,"
    " created_at, delivered_at, attempts, kafka_partition, kafka_offset"
)
LOG = f"SELECT {COLUMNS} FROM outbox.delivery ORDER BY seq, route"


def _publish(conn: psycopg.Connection, numbers: range, topic: str = "t") -> None:
    for n in numbers:
        conn.execute(
            "SELECT outbox.publish(%s, %s::jsonb, %s, idempotency_key => %s)",
            (topic, json.dumps({"n": n}), f"k{n % KEYS}", f"order-{n}"),
        )


def _placed(n: int, _attempt: int) -> Result:
    """Delivered, at a partition and offset the test can check."""
    return Delivered(partition=n % 3, offset=1000 + n)


def test_a_record_writes_one_batch_row_per_route_and_the_view_one_row_per_message(
    database_url: str,
) -> None:
    """Each route's share of a record is one row of delivery_batch; the delivery view gives
    back, per message and route, the message as published and where the sink placed it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox_lib.migrate(conn)
        with conn.transaction():
            _publish(conn, range(COUNT))
    first, second = ScriptedSink(_placed), ScriptedSink(ok)
    with relay_with(
        database_url, runtime("a", first), runtime("b", second), batch_size=COUNT
    ) as relay:
        relay.wait_delivered(COUNT * 2, timeout=30)

    batches = fetch(
        database_url,
        "SELECT route, cardinality(message_id) FROM outbox.delivery_batch ORDER BY route",
    )
    assert batches == [("a", COUNT), ("b", COUNT)], "one record, one row per route"
    log = fetch(
        database_url,
        "SELECT d.route, convert_from(d.payload, 'UTF8')::jsonb ->> 'n', d.topic,"
        " convert_from(d.msg_key, 'UTF8'), d.idempotency_key, d.kafka_partition,"
        " d.kafka_offset, d.attempts, d.content_type"
        " FROM outbox.delivery d ORDER BY d.route, d.seq",
    )
    expected = [
        (route, str(n), "t", f"k{n % KEYS}", f"order-{n}",
         n % 3 if route == "a" else None, 1000 + n if route == "a" else None, 1,
         "application/json")
        for route in ("a", "b") for n in range(COUNT)
    ]  # fmt: skip
    assert log == expected
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0


def test_deliveries_of_the_retry_pass_are_batches_too(database_url: str) -> None:
    """Messages delivered after a retry (from route_pending) are recorded in the same log,
    with the attempts they took."""

    def flaky(n: int, attempt: int) -> Result:
        return Failed("retry", "flaky", "try later") if n % 4 == 0 and attempt < 2 else Delivered()

    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox_lib.migrate(conn)
        with conn.transaction():
            _publish(conn, range(20))
    sink = ScriptedSink(flaky)
    with relay_with(database_url, runtime("r", sink), batch_size=20) as relay:
        relay.wait_delivered(20, timeout=30)
    attempts = fetch(
        database_url,
        "SELECT convert_from(payload, 'UTF8')::jsonb ->> 'n', attempts FROM outbox.delivery"
        " ORDER BY seq",
    )
    assert attempts == [(str(n), 2 if n % 4 == 0 else 1) for n in range(20)]
    assert scalar(database_url, "SELECT count(DISTINCT message_id) FROM outbox.delivery") == 20
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0


def _version_9_log(conn: psycopg.Connection) -> None:
    """Delivery rows as version 9's relays wrote them, one per message and route, over two
    routes, with and without partition and offset (seqs taken before any message's)."""
    conn.execute(
        "INSERT INTO outbox.delivery (message_id, seq, route, topic, msg_key, payload,"
        " content_type, headers, idempotency_key, created_at, delivered_at, attempts,"
        " kafka_partition, kafka_offset)"
        " SELECT gen_random_uuid(), nextval(pg_get_serial_sequence('outbox.message', 'seq')),"
        " CASE WHEN n % 2 = 0 THEN 'r' ELSE 'hook' END, 't',"
        " CASE WHEN n % 3 = 0 THEN NULL ELSE convert_to('k' || n % 5, 'UTF8') END,"
        " convert_to(json_build_object('old', n)::text, 'UTF8'), 'application/json',"
        " jsonb_build_object('h', n), CASE WHEN n % 4 = 0 THEN NULL ELSE 'i' || n END,"
        " now() - make_interval(mins => 100 - n), now() - make_interval(mins => 90 - n), 1 + n % 3,"
        " CASE WHEN n % 2 = 0 THEN n % 6 END, CASE WHEN n % 2 = 0 THEN n * 10 END"
        " FROM generate_series(1, 40) AS n"
    )


def test_an_upgrade_from_version_9_keeps_the_log_and_delivers_every_message_once(
    database_url: str,
) -> None:
    """A version-9 database with a delivery log, messages pending and one parked behind a
    retry. The migration renames the old table rather than copying it; the log reads exactly
    as before, a relay delivers each pending message once in key order, its records join the
    same log, and purge trims the old records as it does the new."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox_lib.migrate(conn, to_version=9)
        _version_9_log(conn)
        with conn.transaction():
            _publish(conn, range(COUNT))
        first = scalar(database_url, "SELECT min(seq) FROM outbox.message")
        conn.execute("UPDATE outbox.message SET fanned = true WHERE seq = %s", (first + 10,))
        conn.execute(
            "INSERT INTO outbox.route_pending (seq, route, topic, msg_key, bucket, attempts)"
            " SELECT seq, 'r', topic, msg_key, bucket, 1 FROM outbox.message WHERE seq = %s",
            (first + 10,),
        )
        before = conn.execute(LOG).fetchall()
        assert outbox_lib.migrate(conn) == [10]
        assert conn.execute(LOG).fetchall() == before, "the log reads as it did"
        assert scalar(database_url, "SELECT outbox.relay_format()") == 3
    sink = ScriptedSink(ok)
    with relay_with(database_url, runtime("r", sink), batch_size=7) as relay:
        relay.wait_delivered(COUNT, timeout=30)
        with psycopg.connect(database_url, autocommit=True) as conn:
            _publish(conn, range(COUNT, COUNT + 20))  # and what commits after the upgrade
        relay.wait_delivered(COUNT + 20, timeout=30)
    _each_once_in_key_order(sink, COUNT + 20)
    log = fetch(database_url, LOG)
    assert log[: len(before)] == before, "the old records are still first"
    assert len(log) == len(before) + COUNT + 20
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0
    # purge takes the old records (all older than 30 minutes) and keeps the new ones.
    with psycopg.connect(database_url, autocommit=True) as conn:
        purged = purge(conn, "outbox", Cutoffs(older_than=dt.timedelta(minutes=30)))
    assert purged.deliveries == len(before)
    assert scalar(database_url, "SELECT count(*) FROM outbox.delivery_row") == 0
    assert fetch(database_url, LOG) == log[len(before) :]


def test_a_downgrade_turns_every_batch_back_into_rows(database_url: str) -> None:
    """Version 10 back to 9 loses no record: each message of each batch becomes one row of
    version 9's table, with its batch's delivered_at."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox_lib.migrate(conn)
        with conn.transaction():
            _publish(conn, range(30))
    with relay_with(database_url, runtime("r", ScriptedSink(_placed)), batch_size=8) as relay:
        relay.wait_delivered(30, timeout=30)
    before: list[tuple[Any, ...]] = fetch(database_url, LOG)
    assert scalar(database_url, "SELECT count(*) FROM outbox.delivery_batch") < 30
    with sync_engine(database_url) as engine, engine.begin() as sa_conn:
        assert outbox_lib.alembic.downgrade(sa_conn, to_version=9, schema="outbox") == [10]
    assert fetch(database_url, LOG) == before
    kind = "SELECT relkind::text FROM pg_class WHERE oid = 'outbox.delivery'::regclass"
    assert scalar(database_url, kind) == "r"
    assert scalar(database_url, "SELECT to_regclass('outbox.delivery_batch')") is None
    assert scalar(database_url, "SELECT to_regclass('outbox.delivery_row')") is None
    assert scalar(database_url, "SELECT outbox.relay_format()") == 2


def test_the_view_refuses_writes_with_an_error_no_relay_retries(database_url: str) -> None:
    """A relay of the previous release records by inserting into delivery: the view refuses
    it with SQLSTATE 0A000, which no relay takes for a database outage (those are
    OperationalError), so that relay gives up at once, naming the fix, and its record (and
    the delete of its messages with it) is rolled back."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox_lib.migrate(conn)
        _publish(conn, range(1))
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            conn.execute(
                "WITH gone AS (DELETE FROM outbox.message RETURNING *)"
                " INSERT INTO outbox.delivery (message_id, seq, route, topic, msg_key, payload,"
                " content_type, headers, idempotency_key, created_at, attempts)"
                " SELECT id, seq, 'r', topic, msg_key, payload, content_type, headers,"
                " idempotency_key, created_at, 1 FROM gone"
            )
    assert not isinstance(refused.value, psycopg.OperationalError)
    assert "outbox.delivery is a view from schema version 10 on" in str(refused.value)
    assert "upgrade the relay" in str(refused.value)
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 1, "nothing lost"
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in ("UPDATE outbox.delivery SET attempts = 2",
                          "DELETE FROM outbox.delivery"):  # fmt: skip
            conn.execute(statement)  # no rows: the trigger has nothing to refuse
