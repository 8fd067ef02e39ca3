"""``outbox-relay replay`` and ``outbox-relay purge`` (CONTRACT section 8).

Delivery records and dead letters are written with SQL the way the relay writes them, and set
back in time with UPDATE: what is tested here is the CLI. The last test has a real relay
deliver a webhook, replays it, and the receiver gets the same ``webhook-id`` twice.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql as psql

from outbox_lib._sqlfiles import load_queries, with_schema
from relay.purge import Cutoffs, Purged, purge
from tests.acceptance.cli import (
    error_lines,
    execute,
    insert_dead_letter,
    insert_delivery,
    migrate,
    publish_many,
    query,
    run_cli,
    run_on_terminal,
    scalar,
    start_cli,
    start_relay,
)
from tests.harness.relay import wait_until
from tests.harness.webhook import WebhookServer, new_secret

pytestmark = pytest.mark.acceptance

HOOK = "billing-hook"
KAFKA = "orders-to-kafka"
TOPIC = "orders.created"


def _env(database_url: str) -> dict[str, str | None]:
    return {"OUTBOX_DATABASE_URL": database_url}


def _replay(database_url: str, *args: str) -> str:
    result = run_cli("replay", *args, env=_env(database_url))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def _messages(database_url: str) -> list[tuple[Any, ...]]:
    return query(
        database_url,
        "SELECT seq, id, topic, msg_key, payload, content_type, headers, idempotency_key,"
        " bucket, created_at, fanned FROM outbox.message ORDER BY seq",
    )


def _pending(database_url: str) -> list[tuple[Any, ...]]:
    return query(
        database_url,
        "SELECT seq, route, topic, msg_key, bucket, attempts, available_at <= now(), claimed_by"
        " FROM outbox.route_pending ORDER BY seq, route",
    )


def _idempotency(database_url: str) -> list[tuple[Any, ...]]:
    return query(database_url, "SELECT * FROM outbox.idempotency ORDER BY topic, idempotency_key")


def _batches_of_one(rows: str) -> str:
    """An INSERT of delivery records straight into the log, each a batch of one: ``rows`` is a
    SELECT of route, delivered_at, message id, seq, topic, key, payload, content type,
    headers, idempotency key, created_at and attempts."""
    return (
        "INSERT INTO outbox.delivery_batch (route, delivered_at, message_id, seq, topic, msg_key,"
        " payload, content_type, headers, idempotency_key, created_at, attempts, kafka_partition,"
        " kafka_offset) SELECT route, delivered_at, ARRAY[id], ARRAY[n], ARRAY[topic], ARRAY[k],"
        " ARRAY[body], ARRAY[ct], ARRAY[h::jsonb], ARRAY[ik::text], ARRAY[created],"
        " ARRAY[attempts], ARRAY[NULL::int], ARRAY[NULL::bigint] FROM (" + rows + ") AS r(route,"
        " delivered_at, id, n, topic, k, body, ct, h, ik, created, attempts)"
    )


def _age_deliveries(database_url: str, interval: str, ids: list[uuid.UUID]) -> None:
    execute(
        database_url,
        "UPDATE outbox.delivery_batch SET delivered_at = now() - %s::interval"
        " WHERE message_id && %s::uuid[]",
        (interval, ids),
    )


# --- replay -----------------------------------------------------------------------------


def test_replay_requeues_the_same_messages_for_that_route_only(database_url: str) -> None:
    migrate(database_url)
    # Published for real, so the idempotency table has rows a replay must leave alone.
    [published] = publish_many(
        database_url,
        [{"topic": TOPIC, "payload": {"n": 0}, "key": "k0", "idempotency_key": "order-0"}],
    )
    execute(database_url, "DELETE FROM outbox.message")
    idempotency = _idempotency(database_url)
    assert len(idempotency) == 1
    first = insert_delivery(
        database_url, route=HOOK, topic=TOPIC, message_id=published, key=b"k0",
        idempotency_key="order-0", payload=b'{"n": 0}', headers={"tenant": "acme"},
    )  # fmt: skip
    second = insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"k1")
    keyless = insert_delivery(database_url, route=HOOK, topic=TOPIC, idempotency_key="order-2")
    # The same message went to another route too, and another topic went to this route.
    insert_delivery(database_url, route=KAFKA, topic=TOPIC, message_id=first, key=b"k0")
    insert_delivery(database_url, route=HOOK, topic="orders.paid", key=b"k0")

    out = _replay(database_url, "--topic", TOPIC, "--route", HOOK)

    assert out == f"replayed 3 message(s) of topic {TOPIC} to route {HOOK}\n"
    messages = _messages(database_url)
    assert [m[1] for m in messages] == [first, second, keyless], "in delivery order"
    (seq0, _, topic0, key0, payload0, ctype0, headers0, idem0, bucket0, _, fanned0) = messages[0]
    assert (topic0, bytes(key0), bytes(payload0), ctype0) == (
        TOPIC, b"k0", b'{"n": 0}', "application/json",
    )  # fmt: skip
    assert (headers0, idem0, fanned0) == ({"tenant": "acme"}, "order-0", True)
    assert bucket0 == scalar(database_url, "SELECT outbox.key_bucket('k0'::bytea)")
    assert messages[1][8] == scalar(database_url, "SELECT outbox.key_bucket('k1'::bytea)")
    assert messages[2][3] is None and messages[2][7] == "order-2"
    assert all(m[10] for m in messages), "already fanned: no first pass over every route"
    assert _pending(database_url) == [
        (m[0], HOOK, TOPIC, m[3], m[8], 0, True, None) for m in messages
    ], "one route_pending row each, for the replayed route only, due now"
    assert seq0 == messages[0][0]
    assert _idempotency(database_url) == idempotency, "the idempotency table is untouched"
    assert scalar(database_url, "SELECT count(*) FROM outbox.delivery") == 5


def test_replay_window_key_and_limit(database_url: str) -> None:
    migrate(database_url)
    old = insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"a")
    middle = insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"b")
    recent = [insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"a") for _ in range(3)]
    _age_deliveries(database_url, "3 days", [old])
    _age_deliveries(database_url, "5 hours", [middle])
    _age_deliveries(database_url, "10 minutes", recent)

    def replayed(*args: str) -> list[uuid.UUID]:
        execute(database_url, "TRUNCATE outbox.message, outbox.route_pending")
        out = _replay(database_url, "--topic", TOPIC, "--route", HOOK, *args)
        ids = [m[1] for m in _messages(database_url)]
        assert out == f"replayed {len(ids)} message(s) of topic {TOPIC} to route {HOOK}\n"
        return ids

    assert replayed("--since", "1h") == recent
    assert replayed("--since", "1d", "--until", "1h") == [middle]
    assert replayed("--until", "1d") == [old]
    assert replayed("--key", "a") == [old, *recent]
    assert replayed("--key", "a", "--since", "1d", "--limit", "2") == recent[:2]
    assert replayed("--key", "\\x62") == [middle], "a key in hex, as dead-letters list shows"
    [(iso,)] = query(
        database_url, "SELECT to_char(now() - interval '1 day', 'YYYY-MM-DD\"T\"HH24:MI:SSOF')"
    )
    assert replayed("--since", iso) == [middle, *recent]


def test_replay_of_a_message_delivered_twice_requeues_it_once(database_url: str) -> None:
    migrate(database_url)
    once = insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"k")
    later = insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"k")
    insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"k", message_id=once)

    _replay(database_url, "--topic", TOPIC, "--route", HOOK)

    assert [m[1] for m in _messages(database_url)] == [once, later], "first delivery's order"


def test_replay_twice_queues_each_message_once(database_url: str) -> None:
    """A message already waiting for the route (replayed, not yet delivered) is skipped and
    counted as such; one waiting for another route is not."""
    migrate(database_url)
    ids = [insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"k") for _ in range(3)]
    insert_delivery(database_url, route=KAFKA, topic=TOPIC, message_id=ids[0], key=b"k")
    line = f"of topic {TOPIC} to route {HOOK}"

    assert _replay(database_url, "--topic", TOPIC, "--route", KAFKA).startswith("replayed 1 ")
    first = _replay(database_url, "--topic", TOPIC, "--route", HOOK)
    again = _replay(database_url, "--topic", TOPIC, "--route", HOOK)
    dry = _replay(database_url, "--topic", TOPIC, "--route", HOOK, "--dry-run")
    limited = _replay(database_url, "--topic", TOPIC, "--route", HOOK, "--limit", "2")

    assert first == f"replayed 3 message(s) {line}\n"
    assert again == f"replayed 0 message(s) {line} (3 already queued, skipped)\n"
    assert dry == f"would replay 0 message(s) {line} (3 already queued, skipped)\n"
    assert limited == f"replayed 0 message(s) {line} (2 already queued, skipped)\n"
    pending = [
        (m[1], p[1]) for m, p in zip(_messages(database_url), _pending(database_url), strict=True)
    ]
    assert pending == [(ids[0], KAFKA), *((id_, HOOK) for id_ in ids)], "each queued once"

    later = insert_delivery(database_url, route=HOOK, topic=TOPIC, key=b"k")
    _deliver(database_url, ids[1])
    out = _replay(database_url, "--topic", TOPIC, "--route", HOOK)

    assert out == f"replayed 2 message(s) {line} (2 already queued, skipped)\n"
    hook = [
        m[1]
        for m, p in zip(_messages(database_url), _pending(database_url), strict=True)
        if p[1] == HOOK
    ]
    assert hook == [ids[0], ids[2], ids[1], later]


def _deliver(database_url: str, message_id: uuid.UUID) -> None:
    """What a relay does once it delivered every route of a message."""
    execute(
        database_url,
        "WITH gone AS (DELETE FROM outbox.message WHERE id = %s RETURNING seq)"
        " DELETE FROM outbox.route_pending WHERE seq IN (SELECT seq FROM gone)",
        (message_id,),
    )


def test_replay_dry_run_changes_nothing(database_url: str) -> None:
    migrate(database_url)
    for _ in range(4):
        insert_delivery(database_url, route=HOOK, topic=TOPIC)

    out = _replay(database_url, "--topic", TOPIC, "--route", HOOK, "--limit", "3", "--dry-run")

    assert out == f"would replay 3 message(s) of topic {TOPIC} to route {HOOK}\n"
    assert _messages(database_url) == [] and _pending(database_url) == []


def test_replay_to_a_route_not_configured_warns_and_replays(
    database_url: str, tmp_config: Callable[..., Path]
) -> None:
    migrate(database_url)
    insert_delivery(database_url, route="old-hook", topic=TOPIC)
    config = tmp_config(
        '[[routes]]\nname = "billing-hook"\ntopics = ["orders.*"]\nsink = "webhook"\n'
        'url = "https://billing.example/hook"\nsecret = "whsec_c2VjcmV0"\n'
    )

    result = run_cli(
        "replay", "--topic", TOPIC, "--route", "old-hook", "--config", str(config),
        env=_env(database_url),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"replayed 1 message(s) of topic {TOPIC} to route old-hook\n"
    assert error_lines(result.stderr) == [
        "warning: route old-hook is not in the loaded configuration; its replayed messages "
        "wait until a relay that has this route runs"
    ]
    assert [p[1] for p in _pending(database_url)] == ["old-hook"]


def test_replay_with_since_after_until_exits_2_and_changes_nothing(database_url: str) -> None:
    migrate(database_url)
    insert_delivery(database_url, route=HOOK, topic=TOPIC)

    result = run_cli(
        "replay", "--topic", TOPIC, "--route", HOOK, "--since", "1h", "--until", "2h",
        env=_env(database_url),
    )  # fmt: skip

    assert result.returncode == 2
    assert error_lines(result.stderr) == ["outbox-relay: error: --since must not be after --until"]
    assert _messages(database_url) == []


def test_replay_of_nothing_is_not_an_error(database_url: str) -> None:
    migrate(database_url)

    out = _replay(database_url, "--topic", TOPIC, "--route", HOOK)

    assert out == f"replayed 0 message(s) of topic {TOPIC} to route {HOOK}\n"


def test_replay_on_an_unreachable_database_exits_1_with_one_line() -> None:
    result = run_cli(
        "replay", "--topic", TOPIC, "--route", HOOK,
        env={"OUTBOX_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )  # fmt: skip

    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith("outbox-relay: error: cannot connect to the database")


# --- purge ------------------------------------------------------------------------------


def _purge(database_url: str, *args: str) -> str:
    result = run_cli("purge", *args, env=_env(database_url))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _delivery_ids(database_url: str) -> set[uuid.UUID]:
    return {row[0] for row in query(database_url, "SELECT message_id FROM outbox.delivery")}


def _letter_ids(database_url: str) -> set[uuid.UUID]:
    return {row[0] for row in query(database_url, "SELECT message_id FROM outbox.dead_letter")}


def _discard(database_url: str, ids: list[uuid.UUID], ago: str) -> None:
    execute(
        database_url,
        "UPDATE outbox.dead_letter SET discarded_at = now() - %s::interval,"
        " discarded_reason = 'test', dead_at = now() - %s::interval - interval '1 hour'"
        " WHERE message_id = ANY(%s)",
        (ago, ago, ids),
    )


def test_purge_deletes_exactly_the_old_deliveries_and_discarded_letters(
    database_url: str,
) -> None:
    migrate(database_url)
    old_deliveries = [insert_delivery(database_url, route=HOOK, topic=TOPIC) for _ in range(3)]
    new_deliveries = [insert_delivery(database_url, route=HOOK, topic=TOPIC) for _ in range(2)]
    _age_deliveries(database_url, "8 days", old_deliveries)
    _age_deliveries(database_url, "6 days 23 hours", new_deliveries[:1])
    old_discarded = [insert_dead_letter(database_url, route=HOOK, topic=TOPIC) for _ in range(2)]
    new_discarded = insert_dead_letter(database_url, route=HOOK, topic=TOPIC)
    old_live = insert_dead_letter(
        database_url, route=HOOK, topic=TOPIC, dead_seconds_ago=30 * 86400
    )
    new_live = insert_dead_letter(database_url, route=HOOK, topic=TOPIC)
    _discard(database_url, old_discarded, "10 days")
    _discard(database_url, [new_discarded], "6 days")

    dry = _purge(database_url, "--older-than", "7d", "--dry-run")
    assert dry == "would purge 3 delivery record(s) and 2 discarded dead letter(s) older than 7d\n"
    assert len(_delivery_ids(database_url)) == 5 and len(_letter_ids(database_url)) == 5

    out = _purge(database_url, "--older-than", "7d")

    assert out == "purged 3 delivery record(s) and 2 discarded dead letter(s) older than 7d\n"
    assert _delivery_ids(database_url) == set(new_deliveries)
    assert _letter_ids(database_url) == {new_discarded, old_live, new_live}, (
        "live dead letters stay, however old"
    )
    again = _purge(database_url, "--older-than", "7d")
    assert again == "purged 0 delivery record(s) and 0 discarded dead letter(s) older than 7d\n"


def test_purge_of_inbox_rows_is_separate_and_opt_in(database_url: str) -> None:
    migrate(database_url)
    for consumer, key in [("billing", f"k{n}") for n in range(5)] + [("shipping", "k0")]:
        execute(database_url, "SELECT outbox.inbox_accept(%s, %s)", (consumer, key))
    execute(
        database_url,
        "UPDATE outbox.inbox SET accepted_at = now() - interval '31 days'"
        " WHERE idempotency_key IN ('k0', 'k1')",
    )
    old_delivery = insert_delivery(database_url, route=HOOK, topic=TOPIC)
    _age_deliveries(database_url, "40 days", [old_delivery])

    assert _purge(database_url, "--older-than", "7d", "--dry-run") == (
        "would purge 1 delivery record(s) and 0 discarded dead letter(s) older than 7d\n"
    )
    assert _purge(database_url, "--inbox-older-than", "30d", "--dry-run") == (
        "would purge 3 inbox row(s) older than 30d\n"
    )
    out = _purge(database_url, "--inbox-older-than", "30d", "--batch-size", "2")
    assert out == "purged 3 inbox row(s) older than 30d\n"
    left = query(database_url, "SELECT consumer, idempotency_key FROM outbox.inbox ORDER BY 1, 2")
    assert left == [("billing", "k2"), ("billing", "k3"), ("billing", "k4")]
    assert _delivery_ids(database_url) == {old_delivery}, "--older-than was not given"

    both = _purge(database_url, "--older-than", "7d", "--inbox-older-than", "1d")
    assert both.splitlines() == [
        "purged 1 delivery record(s) and 0 discarded dead letter(s) older than 7d",
        "purged 0 inbox row(s) older than 1d",
    ]
    neither = run_cli("purge", env=_env(database_url))
    assert neither.returncode == 2
    assert neither.stderr.strip().endswith("purge needs --older-than, --inbox-older-than or both")


def test_purge_works_in_batches(database_url: str) -> None:
    migrate(database_url)
    old = [insert_delivery(database_url, route=HOOK, topic=TOPIC) for _ in range(7)]
    kept = insert_delivery(database_url, route=HOOK, topic=TOPIC)
    _age_deliveries(database_url, "2 hours", old)
    letters = [insert_dead_letter(database_url, route=KAFKA, topic=TOPIC) for _ in range(3)]
    _discard(database_url, letters, "2 hours")

    result = run_cli(
        "purge", "--older-than", "90m", "--batch-size", "2", "--log-level", "debug",
        env=_env(database_url),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "purged 7 delivery record(s) and 3 discarded dead letter(s) older than 90m\n"
    )
    batches = re.findall(r"purge: batch (\d+) deleted (\d+) row\(s\) \((\w+)\)", result.stderr)
    assert batches == [
        ("1", "2", "ops_purge_deliveries"), ("2", "2", "ops_purge_deliveries"),
        ("3", "2", "ops_purge_deliveries"), ("4", "1", "ops_purge_deliveries"),
        ("5", "2", "ops_purge_discarded"), ("6", "1", "ops_purge_discarded"),
    ], "seven rows in batches of two"  # fmt: skip
    assert _delivery_ids(database_url) == {kept}
    assert _letter_ids(database_url) == set()


def test_purge_on_a_terminal_shows_progress(database_url: str) -> None:
    migrate(database_url)
    execute(
        database_url,
        _batches_of_one(
            "SELECT %s, now() - interval '8 days', gen_random_uuid(), n, %s, NULL::bytea,"
            " '\\x7b7d'::bytea, 'application/json', '{}', NULL, now() - interval '9 days', 1"
            " FROM generate_series(1, 25) AS n"
        ),
        (HOOK, TOPIC),
    )

    code, output = run_on_terminal(
        "purge", "--older-than", "7d", "--batch-size", "1", env=_env(database_url)
    )

    assert code == 0, output
    progress = [line for line in output.splitlines() if line.startswith("purge: ")]
    shown = [
        re.fullmatch(
            r"purge: (\d+) delivery record\(s\), 0 discarded dead letter\(s\), 0 inbox row\(s\)"
            r" so far \((\d+) batches\)",
            line,
        )
        for line in progress
    ]
    assert all(shown), progress
    # One line every 10 batches; a batch takes at most one record here (one whose window of
    # heap blocks held none takes nothing).
    batches = [(int(m[1]), int(m[2])) for m in shown if m]
    assert [b for _, b in batches] == [10, 20], progress
    assert all(b - 1 <= records <= b for records, b in batches), progress
    assert output.splitlines()[-1] == (
        "purged 25 delivery record(s) and 0 discarded dead letter(s) older than 7d"
    )


def test_purge_waits_out_a_lock_instead_of_failing(database_url: str) -> None:
    """A batch that cannot get its lock within the timeout (1 s) is tried again later: the
    purge neither fails nor queues for long in front of whoever wants the table next."""
    migrate(database_url)
    old = insert_delivery(database_url, route=HOOK, topic=TOPIC)
    _age_deliveries(database_url, "8 days", [old])
    with psycopg.connect(database_url) as blocker:
        # SHARE conflicts with the DELETE's ROW EXCLUSIVE lock, as CREATE INDEX would.
        blocker.execute("LOCK TABLE outbox.delivery_batch IN SHARE MODE")
        purge = start_cli("purge", "--older-than", "7d", env=_env(database_url))
        try:
            wait_until(lambda: _waiting_deletes(database_url) == 1, 20, "the purge to wait")
            time.sleep(1.5)  # more than the lock timeout: its first try gives up
        finally:
            blocker.rollback()
            out, err = purge.communicate(timeout=30)

    assert purge.returncode == 0, err
    assert out == "purged 1 delivery record(s) and 0 discarded dead letter(s) older than 7d\n"
    assert "purge: a batch waited 1s for a lock; trying again in" in err
    assert _delivery_ids(database_url) == set()


def _waiting_deletes(database_url: str) -> int:
    return int(
        scalar(
            database_url,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%DELETE FROM%delivery%'",
        )
    )


def _fill(database_url: str, deliveries: int, letters: int, payload_bytes: int = 2) -> None:
    """Deliveries, the first half delivered 8 days ago and the rest a day ago; dead letters,
    two in three discarded 8 days ago (the rest live, in between). Autovacuum stays off, so
    that only the purge reads these tables while it runs."""
    execute(
        database_url,
        _batches_of_one(
            "SELECT 'r',"
            " now() - CASE WHEN n <= %s / 2 THEN interval '8 days' ELSE interval '1 day' END,"
            " gen_random_uuid(), n, 't', NULL::bytea, convert_to(repeat('x', %s), 'UTF8'),"
            " 'application/json', '{}', NULL, now() - interval '9 days', 1"
            " FROM generate_series(1, %s) AS n"
        ),
        (deliveries, payload_bytes, deliveries),
    )
    execute(
        database_url,
        "INSERT INTO outbox.dead_letter (message_id, seq, route, topic, payload, content_type,"
        " headers, bucket, created_at, attempts, reason, dead_at, discarded_at)"
        " SELECT gen_random_uuid(), n, 'r', 't', convert_to(repeat('x', %s), 'UTF8'),"
        " 'application/json', '{}', 0, now() - interval '10 days', 1, 'x',"
        " now() - interval '9 days',"
        " CASE WHEN n %% 3 = 0 THEN NULL ELSE now() - interval '8 days' END"
        " FROM generate_series(1, %s) AS n",
        (payload_bytes, letters),
    )
    for table in ("delivery_batch", "dead_letter"):
        execute(database_url, f"ALTER TABLE outbox.{table} SET (autovacuum_enabled = false)")
        execute(database_url, f"VACUUM ANALYZE outbox.{table}")


@pytest.mark.parametrize(
    ("table", "batch"),
    [("delivery_batch", "ops_purge_deliveries"), ("dead_letter", "ops_purge_discarded")],
)
def test_a_purge_batch_reads_only_its_window_of_blocks(
    database_url: str, table: str, batch: str
) -> None:
    """Like the claim's plan check: a batch picks its rows and deletes them with TID range
    scans of its window of heap blocks, never through an index (the BRIN index would have
    it re-read every block earlier batches emptied) nor by reading the whole table. The pass
    that finds the span of old deliveries uses the BRIN index."""
    migrate(database_url)
    _fill(database_url, 100_000, 30_000)
    queries = load_queries("relay", "sql/queries.sql")
    params = {"limit": 5000, "after": "(10,0)", "before": "(110,0)", "last": "(60,5)"}

    with psycopg.connect(database_url, autocommit=True) as conn:
        params["cutoff"] = conn.execute("SELECT now() - interval '7 days'").fetchall()[0][0]
        plans = {
            name: _plan(conn, queries[name], params)
            for name in (f"{batch}_pick", batch, "ops_purge_deliveries_span")
        }

    for name in (f"{batch}_pick", batch):
        assert ("Tid Range Scan", table, None) in plans[name], plans[name]
        scans = {kind for kind, rel, index in plans[name] if "Scan" in kind and (rel or index)}
        assert scans == {"Tid Range Scan"}, plans[name]
    span = plans["ops_purge_deliveries_span"]
    assert ("Bitmap Index Scan", None, "delivery_batch_delivered_at_idx") in span, span


def _plan(
    conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]
) -> list[tuple[str, str | None, str | None]]:
    explain = psql.SQL("EXPLAIN (FORMAT JSON) ") + with_schema(statement, "outbox")
    [(plan,)] = conn.execute(explain, params).fetchall()
    return [
        (n["Node Type"], n.get("Relation Name"), n.get("Index Name"))
        for n in _plan_nodes(plan[0]["Plan"])
    ]


def test_purge_reads_as_many_blocks_in_its_last_batches_as_in_its_first(
    database_url: str,
) -> None:
    """The purge is linear: a batch reads its window of blocks and the rows it deletes,
    never what earlier batches emptied, so the blocks each batch reads (PostgreSQL's own
    count, pg_statio_user_tables, flushed after every batch) do not grow, nor shrink, with
    the batch number. Picking rows through the BRIN index, the 20th batch of deliveries read
    half as much again as the first; through the btree on discarded_at, each batch of dead
    letters read every letter still to purge."""
    migrate(database_url)
    _fill(database_url, 20_000, 15_000, payload_bytes=300)
    blocks: list[tuple[int, int]] = []

    with psycopg.connect(database_url, autocommit=True) as conn:

        def count_blocks(_: Purged | None = None) -> None:
            conn.execute("SELECT pg_stat_force_next_flush()")
            [row] = conn.execute(
                "SELECT sum(heap_blks_hit + heap_blks_read)"
                " FILTER (WHERE relname = 'delivery_batch'),"
                " sum(heap_blks_hit + heap_blks_read) FILTER (WHERE relname = 'dead_letter')"
                " FROM pg_statio_user_tables WHERE schemaname = 'outbox'"
            ).fetchall()
            blocks.append((int(row[0]), int(row[1])))

        count_blocks()
        purged = purge(
            conn, "outbox", Cutoffs(dt.timedelta(days=7)), batch_size=500, on_batch=count_blocks
        )

    assert (purged.deliveries, purged.dead_letters) == (10_000, 10_000)
    read = [(d1 - d0, l1 - l0) for (d0, l0), (d1, l1) in itertools.pairwise(blocks)]
    for per_batch in ([d for d, _ in read if d], [letters for _, letters in read if letters]):
        # The first batch also counts the pass that finds the span; the last, a part window.
        middle = per_batch[1:-1]
        assert len(middle) >= 18, per_batch
        assert max(middle) <= 1.1 * min(middle), per_batch


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


# --- end to end -------------------------------------------------------------------------


def test_a_replayed_webhook_arrives_again_with_the_same_webhook_id(
    database_url: str, tmp_config: Callable[..., Path]
) -> None:
    migrate(database_url)
    secret = new_secret()
    with WebhookServer(secret) as server:
        config = tmp_config(
            f'[[routes]]\nname = "{HOOK}"\ntopics = ["{TOPIC}"]\nsink = "webhook"\n'
            f'url = "{server.url("/hook")}"\nsecret = "{secret}"\nallow_private_network = true\n'
        )
        env = {**_env(database_url), "OUTBOX_POLL_INTERVAL": "0.2"}
        publish_many(
            database_url,
            [
                {"topic": TOPIC, "payload": {"n": 1}, "key": "k", "idempotency_key": "order-1"},
                {"topic": TOPIC, "payload": {"n": 2}, "key": "k"},
            ],
        )
        with start_relay("--config", str(config), env=env) as relay:
            assert server.wait_for(2, timeout=20), relay.output
            wait_until(
                lambda: scalar(database_url, "SELECT count(*) FROM outbox.delivery") == 2,
                10,
                "both deliveries recorded",
            )
            idempotency = _idempotency(database_url)

            out = _replay(database_url, "--topic", TOPIC, "--route", HOOK, "--key", "k")

            assert out == f"replayed 2 message(s) of topic {TOPIC} to route {HOOK}\n"
            assert server.wait_for(4, timeout=20), relay.output
            wait_until(
                lambda: scalar(database_url, "SELECT count(*) FROM outbox.delivery") == 4,
                10,
                "the replayed deliveries recorded",
            )
            assert relay.stop() == 0, relay.output

    requests = server.requests
    first, second = requests[:2], requests[2:]
    assert [r.webhook_id for r in second] == [r.webhook_id for r in first]
    assert first[0].webhook_id == "order-1"
    assert [r.json() for r in second] == [{"n": 1}, {"n": 2}], "in the original order"
    assert all(r.ok for r in requests), "signed with the route's secret"
    assert _idempotency(database_url) == idempotency
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.route_pending") == 0
