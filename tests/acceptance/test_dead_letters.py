"""``outbox-relay dead-letters list|retry|discard`` (CONTRACT section 8).

Dead letters are written with SQL the way the relay writes them: what is tested here is the
CLI. The last test has a real relay dead-letter a message and deliver it after the retry.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.deadletters import Discarded, Selection, discard_dead_letters, preview
from relay.errors import RelayError
from tests.acceptance.cli import (
    error_lines,
    execute,
    insert_dead_letter,
    migrate,
    publish_many,
    query,
    run_cli,
    run_on_terminal,
    scalar,
    start_cli,
    start_relay,
)
from tests.harness.kafka import KafkaEndpoint, consume_all, create_topic
from tests.harness.relay import wait_until

pytestmark = pytest.mark.acceptance

HOOK = "billing-hook"
KAFKA = "orders-to-kafka"


def _env(database_url: str) -> dict[str, str | None]:
    return {"OUTBOX_DATABASE_URL": database_url}


def _list(database_url: str, *args: str) -> list[dict[str, Any]]:
    result = run_cli("dead-letters", "list", "--json", *args, env=_env(database_url))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert isinstance(document, list)
    return document


def _retry(database_url: str, *args: str) -> str:
    result = run_cli("dead-letters", "retry", *args, env=_env(database_url))
    assert result.returncode == 0, result.stderr
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
        "SELECT seq, route, topic, msg_key, bucket, attempts, available_at <= now(),"
        " last_error, last_status, claimed_by FROM outbox.route_pending ORDER BY seq, route",
    )


def _dead_count(database_url: str) -> int:
    return int(scalar(database_url, "SELECT count(*) FROM outbox.dead_letter"))


def _letters_table(database_url: str) -> list[tuple[Any, ...]]:
    """Every dead-letter row as stored, to prove a command changed nothing."""
    return query(database_url, "SELECT * FROM outbox.dead_letter ORDER BY message_id, route")


def _discarded(database_url: str) -> dict[tuple[uuid.UUID, str], str | None]:
    rows = query(
        database_url,
        "SELECT message_id, route, discarded_reason FROM outbox.dead_letter"
        " WHERE discarded_at IS NOT NULL",
    )
    return {(id_, route): reason for id_, route, reason in rows}


def _age(database_url: str, message_id: uuid.UUID, column: str, interval: str) -> None:
    """Set a dead letter's ``dead_at`` or ``discarded_at`` back in time."""
    assert column in {"dead_at", "discarded_at"}
    execute(
        database_url,
        f"UPDATE outbox.dead_letter SET {column} = now() - %s::interval WHERE message_id = %s",
        (interval, message_id),
    )


# --- list -------------------------------------------------------------------------------


def test_list_json_is_newest_first_with_every_field(database_url: str) -> None:
    migrate(database_url)
    old = insert_dead_letter(
        database_url, route=HOOK, topic="orders.created", key=b"order-7",
        idempotency_key="order-7-created", dead_seconds_ago=30,
    )  # fmt: skip
    binary = insert_dead_letter(
        database_url, route=KAFKA, topic="orders.paid", key=b"\x00\xff", dead_seconds_ago=20,
        reason="MSG_SIZE_TOO_LARGE", last_error=None, last_status=None, attempts=1,
    )  # fmt: skip
    unroutable = insert_dead_letter(
        database_url, route="no-route", topic="audit.x", dead_seconds_ago=10, attempts=0,
        reason="no route", last_error="no route matches topic 'audit.x'", last_status=None,
    )  # fmt: skip

    letters = _list(database_url)

    assert [letter["id"] for letter in letters] == [str(unroutable), str(binary), str(old)]
    for letter in letters:
        assert set(letter) == {
            "id", "route", "topic", "key", "attempts", "last_status", "reason", "last_error",
            "dead_at", "created_at", "idempotency_key",
        }  # fmt: skip
        assert dt.datetime.fromisoformat(letter["dead_at"]).tzinfo is not None
        assert dt.datetime.fromisoformat(letter["created_at"]) < dt.datetime.fromisoformat(
            letter["dead_at"]
        )
    newest, middle, oldest = letters
    assert newest["route"] == "no-route" and newest["key"] is None
    assert newest["reason"] == "no route" and newest["attempts"] == 0
    assert middle["key"] == "\\x00ff", "a key that is not UTF-8 is shown in hex"
    assert middle["last_status"] is None and middle["last_error"] is None
    assert oldest == oldest | {
        "route": HOOK, "topic": "orders.created", "key": "order-7", "attempts": 3,
        "last_status": "HTTP 503", "reason": "max attempts reached (HTTP 503)",
        "last_error": "HTTP 503: unavailable", "idempotency_key": "order-7-created",
    }  # fmt: skip


def test_list_text_is_a_table_with_short_errors(database_url: str) -> None:
    migrate(database_url)
    message_id = insert_dead_letter(
        database_url, route=HOOK, topic="orders.created", key=b"order-7",
        last_error="HTTP 500: " + "x" * 300 + " [upstream]",
    )  # fmt: skip
    insert_dead_letter(database_url, route=KAFKA, topic="orders.paid", key=b"\x00\xff")

    result = run_cli("dead-letters", "list", env=_env(database_url))

    assert result.returncode == 0, result.stderr
    for heading in ("id", "route", "topic", "key", "attempts", "last status", "reason"):
        assert heading in result.stdout
    [row] = [line for line in result.stdout.splitlines() if str(message_id) in line]
    for value in (HOOK, "orders.created", "order-7", "HTTP 503", "HTTP 500: xxx"):
        assert value in row
    assert "x" * 100 not in row, "the last error is cut to about 80 characters"
    assert "…" in row
    assert "\\x00ff" in result.stdout
    assert "showing" not in result.stdout, "no footer when every dead letter is shown"


def test_list_filters_by_topic_and_route(database_url: str) -> None:
    migrate(database_url)
    a = insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    b = insert_dead_letter(database_url, route=KAFKA, topic="orders.created")
    c = insert_dead_letter(database_url, route=HOOK, topic="orders.paid")

    def ids(*args: str) -> set[str]:
        return {letter["id"] for letter in _list(database_url, *args)}

    assert ids("--topic", "orders.created") == {str(a), str(b)}
    assert ids("--route", HOOK) == {str(a), str(c)}
    assert ids("--topic", "orders.created", "--route", HOOK) == {str(a)}
    assert ids("--topic", "nothing.here") == set()


def test_list_filters_by_id_and_since_and_they_combine(database_url: str) -> None:
    migrate(database_url)
    twice = uuid.uuid4()
    insert_dead_letter(database_url, route=HOOK, topic="orders.created", message_id=twice)
    insert_dead_letter(database_url, route=KAFKA, topic="orders.created", message_id=twice)
    recent = insert_dead_letter(database_url, route=HOOK, topic="orders.paid")
    old = insert_dead_letter(database_url, route=HOOK, topic="orders.paid")
    _age(database_url, twice, "dead_at", "30 minutes")
    _age(database_url, old, "dead_at", "3 days")

    def ids(*args: str) -> list[tuple[str, str]]:
        return sorted((letter["id"], letter["route"]) for letter in _list(database_url, *args))

    assert ids("--id", str(twice)) == sorted([(str(twice), HOOK), (str(twice), KAFKA)])
    assert ids("--id", str(twice), "--route", KAFKA) == [(str(twice), KAFKA)]
    assert ids("--since", "10m") == [(str(recent), HOOK)]
    assert len(ids("--since", "1h")) == 3
    assert len(ids("--since", "4d")) == 4
    assert ids("--since", "1h", "--topic", "orders.paid") == [(str(recent), HOOK)]
    assert ids("--since", "10m", "--id", str(twice)) == []
    [(day_ago,)] = query(database_url, "SELECT (now() - interval '1 day')::text")
    assert len(ids("--since", day_ago.replace(" ", "T"))) == 3, "an ISO-8601 time"


def test_list_limit_shows_the_newest_and_says_how_many_more(database_url: str) -> None:
    migrate(database_url)
    ids = [
        insert_dead_letter(database_url, route=HOOK, topic="t", dead_seconds_ago=100 - n)
        for n in range(5)
    ]

    assert [letter["id"] for letter in _list(database_url, "--limit", "2")] == [
        str(ids[4]), str(ids[3]),
    ]  # fmt: skip
    table = run_cli("dead-letters", "list", "--limit", "2", env=_env(database_url))

    assert table.returncode == 0, table.stderr
    assert table.stdout.rstrip().splitlines()[-1] == "showing 2 of 5; use --limit"
    assert str(ids[4]) in table.stdout and str(ids[0]) not in table.stdout


def test_list_of_no_dead_letters(database_url: str) -> None:
    migrate(database_url)

    assert _list(database_url) == []
    text = run_cli("dead-letters", "list", env=_env(database_url))
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == "(no dead letters)"


def test_list_on_an_unmigrated_database_says_to_migrate(database_url: str) -> None:
    result = run_cli("dead-letters", "list", env=_env(database_url))

    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith("outbox-relay: error:") and "outbox-relay migrate" in line


# --- retry ------------------------------------------------------------------------------


def test_retry_of_a_route_letter_queues_the_same_message_for_that_route_only(
    database_url: str,
) -> None:
    migrate(database_url)
    message_id = insert_dead_letter(
        database_url, route=HOOK, topic="orders.created", key=b"order-7",
        payload=b'{"order_id": 7}', headers={"tenant": "acme"},
        idempotency_key="order-7-created", attempts=12,
    )  # fmt: skip
    [(bucket, created_at)] = query(
        database_url, "SELECT bucket, created_at FROM outbox.dead_letter"
    )

    out = _retry(database_url, "--id", str(message_id))

    assert out.startswith("retried 1 dead letter(s)")
    assert HOOK in out
    assert _dead_count(database_url) == 0
    [message] = _messages(database_url)
    seq, id_, topic, key, payload, ctype, headers, idem, m_bucket, m_created, fanned = message
    assert (id_, topic, bytes(key), bytes(payload)) == (
        message_id, "orders.created", b"order-7", b'{"order_id": 7}',
    )  # fmt: skip
    assert (ctype, headers, idem) == ("application/json", {"tenant": "acme"}, "order-7-created")
    assert (m_bucket, m_created) == (bucket, created_at)
    assert fanned is True, "already routed: only the route that dead-lettered it gets it again"
    [pending] = _pending(database_url)
    assert pending == (seq, HOOK, "orders.created", b"order-7", bucket, 0, True, None, None, None)


def test_retry_of_a_no_route_letter_makes_a_new_unrouted_message(database_url: str) -> None:
    migrate(database_url)
    message_id = insert_dead_letter(
        database_url, route="no-route", topic="audit.x", idempotency_key="audit-1",
        reason="no route", attempts=0,
    )  # fmt: skip

    out = _retry(database_url, "--topic", "audit.x")

    assert out.startswith("retried 1 dead letter(s)")
    [message] = _messages(database_url)
    assert message[1] == message_id and message[7] == "audit-1"
    assert message[10] is False, "the relays route it afresh with their current routes"
    assert _pending(database_url) == []


def test_retry_of_a_message_dead_on_two_routes_revives_it_once(database_url: str) -> None:
    migrate(database_url)
    message_id = uuid.uuid4()
    for route in (HOOK, KAFKA):
        insert_dead_letter(database_url, route=route, topic="orders.created", message_id=message_id)
    other = insert_dead_letter(database_url, route=HOOK, topic="orders.paid")

    out = _retry(database_url, "--all")

    assert out.startswith("retried 3 dead letter(s) as 2 message(s)")
    messages = _messages(database_url)
    assert sorted(str(m[1]) for m in messages) == sorted([str(message_id), str(other)])
    seq_of = {m[1]: m[0] for m in messages}
    pending = {(p[0], p[1]) for p in _pending(database_url)}
    assert pending == {(seq_of[message_id], HOOK), (seq_of[message_id], KAFKA),
                       (seq_of[other], HOOK)}  # fmt: skip


def test_retry_selects_by_topic_route_or_id(database_url: str) -> None:
    migrate(database_url)
    a = insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    b = insert_dead_letter(database_url, route=KAFKA, topic="orders.created")
    c = insert_dead_letter(database_url, route=HOOK, topic="orders.paid")
    d = insert_dead_letter(database_url, route=KAFKA, topic="orders.paid")

    assert _retry(database_url, "--topic", "orders.created", "--route", HOOK).startswith(
        "retried 1 dead letter(s)"
    )
    assert {m[1] for m in _messages(database_url)} == {a}
    assert _retry(database_url, "--all", "--route", KAFKA).startswith("retried 2 dead letter(s)")
    assert {m[1] for m in _messages(database_url)} == {a, b, d}
    assert _retry(database_url, "--id", str(c), "--route", HOOK).startswith("retried 1")
    assert _dead_count(database_url) == 0
    assert {(p[1]) for p in _pending(database_url)} == {HOOK, KAFKA}


def test_retry_keeps_the_order_of_a_keys_messages(database_url: str) -> None:
    migrate(database_url)
    # Dead-lettered in the opposite order of publishing: the original order must win.
    first = insert_dead_letter(database_url, route=HOOK, topic="t", key=b"k")
    second = insert_dead_letter(database_url, route=HOOK, topic="t", key=b"k")
    execute(database_url, "UPDATE outbox.dead_letter SET dead_at = now() - (seq * interval '1s')")

    _retry(database_url, "--all")

    assert [m[1] for m in _messages(database_url)] == [first, second]


def test_retry_with_nothing_to_retry_is_not_an_error(database_url: str) -> None:
    migrate(database_url)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")

    assert _retry(database_url, "--topic", "orders.paid").strip() == "no dead letters to retry"
    assert _retry(database_url, "--all", "--route", KAFKA).strip() == "no dead letters to retry"
    assert _dead_count(database_url) == 1


def test_retry_of_an_unknown_id_exits_1_with_one_line(database_url: str) -> None:
    migrate(database_url)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    missing = uuid.uuid4()

    result = run_cli("dead-letters", "retry", "--id", str(missing), env=_env(database_url))

    assert result.returncode == 1
    assert result.stdout == ""
    assert error_lines(result.stderr) == [f"outbox-relay: error: no dead letter has id {missing}"]
    assert _dead_count(database_url) == 1


def test_retry_of_a_malformed_id_exits_2_before_connecting() -> None:
    result = run_cli(
        "dead-letters", "retry", "--id", "order-7",
        env={"OUTBOX_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )  # fmt: skip

    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("outbox-relay: error: argument --id:") and "'order-7'" in line


def test_retry_of_a_disabled_route_warns_and_still_retries(database_url: str) -> None:
    migrate(database_url)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    insert_dead_letter(database_url, route=KAFKA, topic="orders.created")
    execute(
        database_url,
        "INSERT INTO outbox.route_state (route, disabled_at, disabled_reason)"
        " VALUES (%s, now(), 'endpoint gone (HTTP 410)'), (%s, NULL, NULL)",
        (HOOK, KAFKA),
    )

    result = run_cli("dead-letters", "retry", "--all", env=_env(database_url))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("retried 2 dead letter(s)")
    assert error_lines(result.stderr) == [
        f"warning: route {HOOK} is disabled; run `outbox-relay routes enable {HOOK}` "
        "or its messages will be dead-lettered again"
    ]
    assert _dead_count(database_url) == 0


def test_concurrent_retries_revive_each_dead_letter_once(database_url: str) -> None:
    migrate(database_url)
    count = 300
    execute(
        database_url,
        "INSERT INTO outbox.dead_letter (message_id, seq, route, topic, payload, content_type,"
        " headers, bucket, created_at, attempts, reason)"
        " SELECT gen_random_uuid(), n, %s, 'orders.created', '\\x7b7d', 'application/json',"
        " '{}', n %% 256, now(), 12, 'max attempts reached'"
        " FROM generate_series(1, %s) AS n",
        (HOOK, count),
    )

    retries = [
        start_cli("dead-letters", "retry", "--all", env=_env(database_url)) for _ in range(4)
    ]
    outputs = [process.communicate(timeout=30) for process in retries]

    assert [process.returncode for process in retries] == [0, 0, 0, 0], outputs
    revived = 0
    for out, _err in outputs:
        if out.startswith("retried "):
            revived += int(out.split()[1])
        else:
            assert out.strip() == "no dead letters to retry"
    assert revived == count
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == count
    assert scalar(database_url, "SELECT count(DISTINCT id) FROM outbox.message") == count
    assert scalar(database_url, "SELECT count(*) FROM outbox.route_pending") == count
    assert _dead_count(database_url) == 0


def test_retry_dry_run_prints_per_route_and_changes_nothing(database_url: str) -> None:
    migrate(database_url)
    twice = uuid.uuid4()
    insert_dead_letter(database_url, route=HOOK, topic="orders.created", message_id=twice)
    insert_dead_letter(database_url, route=KAFKA, topic="orders.created", message_id=twice)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    old = insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    _age(database_url, old, "dead_at", "2 hours")
    before = _letters_table(database_url)

    out = _retry(database_url, "--all", "--dry-run")
    recent = _retry(database_url, "--topic", "orders.created", "--since", "1h", "--dry-run")
    none = _retry(database_url, "--topic", "orders.paid", "--dry-run")

    assert out == f"would retry 4 dead letter(s) as 3 message(s) ({HOOK}: 3, {KAFKA}: 1)\n"
    assert recent == f"would retry 3 dead letter(s) as 2 message(s) ({HOOK}: 2, {KAFKA}: 1)\n"
    assert none == "no dead letters to retry\n"
    assert _letters_table(database_url) == before
    assert _messages(database_url) == [] and _pending(database_url) == []


def test_retry_since_revives_only_recent_letters(database_url: str) -> None:
    migrate(database_url)
    recent = insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    old = insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    _age(database_url, old, "dead_at", "2 days")

    assert _retry(database_url, "--all", "--since", "1d").startswith("retried 1 dead letter(s)")

    assert [m[1] for m in _messages(database_url)] == [recent]
    assert [letter["id"] for letter in _list(database_url)] == [str(old)]


# --- discard ----------------------------------------------------------------------------


def test_discard_without_a_terminal_or_yes_exits_2_and_changes_nothing(
    database_url: str,
) -> None:
    migrate(database_url)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    before = _letters_table(database_url)

    result = run_cli("dead-letters", "discard", "--all", env=_env(database_url))

    assert result.returncode == 2
    assert result.stdout == ""
    assert error_lines(result.stderr) == [
        "outbox-relay: error: discard needs confirmation: stdin is not a terminal; pass --yes"
    ]
    assert _letters_table(database_url) == before


def test_discard_yes_hides_letters_from_list_status_and_retry(database_url: str) -> None:
    migrate(database_url)
    gone = insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    gone_too = insert_dead_letter(database_url, route=KAFKA, topic="orders.created")
    kept = insert_dead_letter(database_url, route=HOOK, topic="orders.paid")

    result = run_cli(
        "dead-letters", "discard", "--topic", "orders.created", "--yes",
        "--reason", "customer cancelled", env=_env(database_url),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"discarded 2 dead letter(s) ({HOOK}: 1, {KAFKA}: 1)\n"
    assert _discarded(database_url) == {
        (gone, HOOK): "customer cancelled", (gone_too, KAFKA): "customer cancelled",
    }  # fmt: skip
    assert _dead_count(database_url) == 3, "kept for audit"
    assert [letter["id"] for letter in _list(database_url)] == [str(kept)]
    status = json.loads(run_cli("status", "--json", env=_env(database_url)).stdout)
    assert status["topics"] == {
        "orders.paid": {"pending": 0, "dead": 1, "oldest_pending_age_seconds": None}
    }
    assert status["routes"][HOOK]["dead"] == 1
    assert KAFKA not in status["routes"], "a route with only discarded letters is not shown"
    routes = json.loads(run_cli("routes", "list", "--json", env=_env(database_url)).stdout)
    assert routes["routes"][HOOK]["dead"] == 1
    assert _retry(database_url, "--topic", "orders.created").strip() == "no dead letters to retry"
    assert _retry(database_url, "--all").startswith("retried 1 dead letter(s)")
    assert {m[1] for m in _messages(database_url)} == {kept}

    discarded = _list(database_url, "--discarded")
    assert sorted(letter["id"] for letter in discarded) == sorted([str(gone), str(gone_too)])
    for letter in discarded:
        assert letter["discarded_reason"] == "customer cancelled"
        assert dt.datetime.fromisoformat(letter["discarded_at"]) >= dt.datetime.fromisoformat(
            letter["dead_at"]
        )
    table = run_cli("dead-letters", "list", "--discarded", env=_env(database_url))
    assert table.returncode == 0, table.stderr
    assert "discarded at" in table.stdout and "customer cancelled" in table.stdout
    assert str(kept) not in table.stdout


def test_discard_selects_by_id_route_and_since(database_url: str) -> None:
    migrate(database_url)
    a = insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    b = insert_dead_letter(database_url, route=KAFKA, topic="orders.created")
    old = insert_dead_letter(database_url, route=HOOK, topic="orders.paid")
    _age(database_url, old, "dead_at", "3 days")

    def discard(*args: str) -> str:
        result = run_cli("dead-letters", "discard", *args, "--yes", env=_env(database_url))
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert discard("--all", "--since", "1d", "--route", KAFKA) == (
        f"discarded 1 dead letter(s) ({KAFKA}: 1)\n"
    )
    assert discard("--id", str(a)) == f"discarded 1 dead letter(s) ({HOOK}: 1)\n"
    assert discard("--all", "--since", "1d") == "no dead letters to discard\n"
    assert set(_discarded(database_url)) == {(a, HOOK), (b, KAFKA)}
    assert _discarded(database_url)[(a, HOOK)] is None, "no --reason: none recorded"
    missing = run_cli("dead-letters", "discard", "--id", str(a), "--yes", env=_env(database_url))
    assert missing.returncode == 1, "a discarded letter is no longer a dead letter"
    assert error_lines(missing.stderr) == [f"outbox-relay: error: no dead letter has id {a}"]
    assert [letter["id"] for letter in _list(database_url)] == [str(old)]


def test_a_confirmed_discard_takes_exactly_the_letters_counted(database_url: str) -> None:
    """What ``discard`` does between its count and the operator's answer (the command's own
    steps, in process, to act in between). A letter dead-lettered after the count is left
    alone. A letter stamped before the count but committed after it (a relay's transaction
    still open), or a counted letter retried meanwhile, means the letters are no longer the
    ones counted: nothing is discarded, and the command says so."""
    migrate(database_url)
    counted = [
        insert_dead_letter(database_url, route=HOOK, topic="orders.created", dead_seconds_ago=60)
        for _ in range(2)
    ]
    with psycopg.connect(database_url, autocommit=True) as conn:

        def count() -> Selection:
            return preview(conn, "outbox", Selection(topic="orders.created")).selection

        first = count()
        newer = insert_dead_letter(database_url, route=HOOK, topic="orders.created")
        assert discard_dead_letters(conn, "outbox", first) == Discarded({HOOK: 2})
        assert set(_discarded(database_url)) == {(id_, HOOK) for id_ in counted}

        second = count()
        late = insert_dead_letter(
            database_url, route=KAFKA, topic="orders.created", dead_seconds_ago=30
        )
        with pytest.raises(RelayError, match=r"changed after they were counted \(2 match now\)"):
            discard_dead_letters(conn, "outbox", second)
        third = count()
        _retry(database_url, "--id", str(late))
        with pytest.raises(RelayError, match=r"nothing discarded; run the command again"):
            discard_dead_letters(conn, "outbox", third)

    assert set(_discarded(database_url)) == {(id_, HOOK) for id_ in counted}
    assert [letter["id"] for letter in _list(database_url)] == [str(newer)]


def test_discard_dry_run_changes_nothing(database_url: str) -> None:
    migrate(database_url)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    insert_dead_letter(database_url, route=KAFKA, topic="orders.created")
    before = _letters_table(database_url)

    result = run_cli("dead-letters", "discard", "--all", "--dry-run", env=_env(database_url))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"would discard 2 dead letter(s) ({HOOK}: 1, {KAFKA}: 1)\n"
    assert _letters_table(database_url) == before


@pytest.mark.parametrize(("answer", "discarded"), [("y", True), ("n", False), ("", False)])
def test_discard_on_a_terminal_asks_first(database_url: str, answer: str, discarded: bool) -> None:
    migrate(database_url)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    insert_dead_letter(database_url, route=HOOK, topic="orders.paid")

    code, output = run_on_terminal(
        "dead-letters", "discard", "--all", env=_env(database_url), answer=answer
    )

    assert "Discard 2 dead letters? [y/N]" in output
    if discarded:
        assert code == 0, output
        assert output.rstrip().endswith(f"discarded 2 dead letter(s) ({HOOK}: 2)")
        assert len(_discarded(database_url)) == 2
    else:
        assert code == 1, output
        assert output.rstrip().endswith("nothing discarded")
        assert _discarded(database_url) == {}


# --- end to end -------------------------------------------------------------------------


def test_a_retried_no_route_letter_is_delivered_once_a_route_covers_it(
    database_url: str, kafka: KafkaEndpoint, topic_name: str, tmp_config: Callable[..., Path]
) -> None:
    """A message on a topic no route matches is dead-lettered by the relay; after a relay
    with a covering route starts, ``retry --all`` gets it delivered with the same id and
    idempotency key. A Kafka route's own dead letter comes back on that route."""
    migrate(database_url)
    create_topic(kafka.bootstrap, topic_name)
    orders_only = tmp_config(
        f'[kafka]\nbootstrap_servers = "{kafka.bootstrap}"\n\n'
        '[[routes]]\nname = "orders"\ntopics = ["orders.*"]\nsink = "kafka"\n'
    )
    [lost] = publish_many(
        database_url,
        [{"topic": topic_name, "payload": {"n": 1}, "key": "k1", "idempotency_key": "idem-1"}],
    )
    with start_relay("--config", str(orders_only), env=_env(database_url)) as relay:
        wait_until(lambda: _dead_count(database_url) == 1, 15, "the no-route dead letter")
        assert relay.stop() == 0, relay.output
    assert query(database_url, "SELECT route, reason FROM outbox.dead_letter") == [
        ("no-route", "no route")
    ]
    # A dead letter of the default Kafka route ("kafka"), as a permanent error leaves one.
    refused = insert_dead_letter(
        database_url, route="kafka", topic=topic_name, key=b"k2", payload=b'{"n": 2}',
        idempotency_key="idem-2", reason="MSG_SIZE_TOO_LARGE", attempts=1,
    )  # fmt: skip
    every_topic = {**_env(database_url), "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap}

    with start_relay(env=every_topic) as relay:
        out = _retry(database_url, "--all")
        assert out.startswith("retried 2 dead letter(s)"), out
        records = consume_all(kafka.bootstrap, topic_name, expected=2, timeout=30)
        assert len(records) == 2, relay.output
        wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM outbox.delivery") == 2,
            10,
            "both deliveries recorded",
        )
        assert relay.stop() == 0, relay.output

    by_key = {r.key: r for r in records}
    assert by_key[b"k1"].header("outbox-message-id") == str(lost).encode()
    assert by_key[b"k1"].header("idempotency-key") == b"idem-1"
    assert json.loads(by_key[b"k1"].value) == {"n": 1}
    assert by_key[b"k2"].header("outbox-message-id") == str(refused).encode()
    assert by_key[b"k2"].header("idempotency-key") == b"idem-2"
    assert _dead_count(database_url) == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.route_pending") == 0
    assert set(query(database_url, "SELECT message_id, route FROM outbox.delivery")) == {
        (lost, "kafka"), (refused, "kafka"),
    }  # fmt: skip
