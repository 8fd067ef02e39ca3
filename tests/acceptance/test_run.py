"""``outbox-relay run`` end to end: PostgreSQL outbox to a real Kafka-compatible broker
(CONTRACT sections 4, 5 and 8)."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from relay.app import SCHEMA_VERSION
from relay.store import RELAY_FORMAT
from tests.acceptance.cli import (
    RelayProcess,
    error_lines,
    execute,
    migrate,
    publish_many,
    query,
    run_cli,
    scalar,
    start_cli,
    start_relay,
)
from tests.harness.kafka import KafkaEndpoint, Record, consume_all, consume_for, create_topic

pytestmark = pytest.mark.acceptance

CONTRACT_HEADERS = ["idempotency-key", "outbox-message-id", "outbox-topic"]


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _relay_env(database_url: str, bootstrap: str | None = None) -> dict[str, str | None]:
    return {"OUTBOX_DATABASE_URL": database_url, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": bootstrap}


def _index(record: Record) -> int:
    return int(json.loads(record.value)["i"])


def test_run_delivers_everything_with_contract_headers_and_stops_on_sigterm(
    database_url: str, kafka: KafkaEndpoint, topic_name: str
) -> None:
    migrate(database_url)
    create_topic(kafka.bootstrap, topic_name, partitions=3)
    count = 200
    messages = [
        {
            "topic": topic_name,
            "payload": {"i": i},
            "key": f"k{i % 7}",
            "headers": {"tenant": "acme"},
            "idempotency_key": f"order-{i}" if i % 2 == 0 else None,
        }
        for i in range(count)
    ]
    ids = publish_many(database_url, messages)

    with start_relay(env=_relay_env(database_url, kafka.bootstrap)) as relay:
        records = consume_all(kafka.bootstrap, topic_name, expected=count, timeout=30)
        assert len(records) == count, relay.output

        by_id = {str(msg_id): i for i, msg_id in enumerate(ids)}
        assert {r.header("outbox-message-id").decode() for r in records} == set(by_id)  # type: ignore[union-attr]
        for record in records:
            msg_id = record.header("outbox-message-id").decode()  # type: ignore[union-attr]
            i = by_id[msg_id]
            assert _index(record) == i
            assert record.key == f"k{i % 7}".encode()
            assert [name for name, _ in record.headers][:3] == CONTRACT_HEADERS
            assert record.header("outbox-topic") == topic_name.encode()
            expected_idem = f"order-{i}" if i % 2 == 0 else msg_id
            assert record.header("idempotency-key") == expected_idem.encode()
            assert record.header("tenant") == b"acme"
        # Same key, same partition, publish order.
        for key in {r.key for r in records}:
            same_key = sorted((r for r in records if r.key == key), key=lambda r: r.offset)
            assert len({r.partition for r in same_key}) == 1
            assert [_index(r) for r in same_key] == sorted(_index(r) for r in same_key)

        started = time.monotonic()
        code = relay.stop(signal.SIGTERM, timeout=15)
        stopping = time.monotonic() - started

    assert code == 0, relay.output
    # Nothing was in flight: the relay exits at once (about 0.2 s here), waiting out neither
    # the shutdown grace given to sends in flight (10 s) nor its producer's flush (5 s).
    assert stopping < 3, relay.output
    assert "Traceback" not in relay.output
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.route_pending") == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.dead_letter") == 0
    delivered = query(database_url, "SELECT message_id, topic FROM outbox.delivery")
    assert len(delivered) == count
    assert {str(m) for m, _ in delivered} == set(by_id)
    assert {t for _, t in delivered} == {topic_name}


def test_run_delivers_messages_published_while_running_and_stops_on_sigint(
    database_url: str, kafka: KafkaEndpoint, topic_name: str
) -> None:
    migrate(database_url)
    create_topic(kafka.bootstrap, topic_name)

    with start_relay(env=_relay_env(database_url, kafka.bootstrap)) as relay:
        publish_many(database_url, [{"topic": topic_name, "payload": {"i": i}} for i in range(5)])
        records = consume_all(kafka.bootstrap, topic_name, expected=5, timeout=20)
        assert sorted(_index(r) for r in records) == list(range(5)), relay.output
        assert all(r.key is None for r in records)

        code = relay.stop(signal.SIGINT, timeout=15)

    assert code == 0, relay.output
    assert "Traceback" not in relay.output
    _wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM outbox.delivery") == 5, 1, "deliveries"
    )
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0


def test_sigterm_mid_stream_releases_claims_so_a_restarted_relay_delivers_the_rest(
    database_url: str, kafka: KafkaEndpoint, topic_name: str
) -> None:
    migrate(database_url)
    create_topic(kafka.bootstrap, topic_name)
    count = 3000
    ids = publish_many(
        database_url, [{"topic": topic_name, "payload": {"i": i}} for i in range(count)]
    )
    env = _relay_env(database_url, kafka.bootstrap)
    batch = 50
    small_batches = ("--batch-size", str(batch))

    # The test holds the delivery log, so the first relay's first batch, sent, waits to be
    # recorded until SIGTERM has arrived: the
    # signal always lands mid-stream, however fast the machine drains.
    with psycopg.connect(database_url) as blocker:
        blocker.execute("LOCK TABLE outbox.delivery_batch IN SHARE MODE")
        with start_relay(*small_batches, env=env) as first:
            _wait_until(
                lambda: scalar(database_url, _WAITING_ON_DELIVERY) > 0,
                15,
                "the first batch to wait to be recorded",
            )
            first.popen.send_signal(signal.SIGTERM)
            assert first.wait_for(r"received SIGTERM", 10), first.output
            blocker.rollback()
            assert first.popen.wait(15) == 0, first.output

    left = scalar(database_url, "SELECT count(*) FROM outbox.message")
    # What was in flight was finished and recorded: the batch waiting on the log, and the
    # one sent while it waited (the first pass is a pipeline of two); nothing was read after.
    assert left in (count - batch, count - 2 * batch), first.output
    assert scalar(database_url, "SELECT count(*) FROM outbox.delivery") == count - left
    # The stopped relay gave its buckets back: the next one reads the first pass at once.
    assert (
        scalar(database_url, "SELECT count(*) FROM outbox.bucket_lease WHERE holder IS NOT NULL")
        == 0
    )
    assert scalar(database_url, "SELECT count(*) FROM outbox.route_pending") == 0

    with start_relay(*small_batches, env=env) as second:
        _wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM outbox.message") == 0,
            20,
            "the second relay to drain the outbox",
        )
        assert second.stop() == 0, second.output

    delivered = query(database_url, "SELECT DISTINCT message_id FROM outbox.delivery")
    assert {m for (m,) in delivered} == set(ids)
    records = consume_all(kafka.bootstrap, topic_name, expected=count, timeout=20)
    assert {_index(r) for r in records} == set(range(count))


_WAITING_ON_DELIVERY = (
    "SELECT count(*) FROM pg_locks WHERE NOT granted"
    " AND relation = 'outbox.delivery_batch'::regclass"
)


def _routes_config(tmp_config: Callable[..., Path], bootstrap: str, kafka_topic: str) -> str:
    return str(
        tmp_config(
            f"""
[kafka]
bootstrap_servers = "{bootstrap}"

[kafka.producer]
"linger.ms" = 5

[[routes]]
name = "orders-to-kafka"
topics = ["orders.*"]
sink = "kafka"
kafka_topic = "{kafka_topic}"
"""
        )
    )


def test_run_with_routes_from_a_toml_file_and_a_topic_no_route_matches(
    database_url: str, kafka: KafkaEndpoint, topic_name: str, tmp_config: Callable[..., Path]
) -> None:
    migrate(database_url)
    create_topic(kafka.bootstrap, topic_name)
    config = _routes_config(tmp_config, kafka.bootstrap, topic_name)
    publish_many(
        database_url,
        [
            {"topic": "orders.created", "payload": {"i": 0}, "key": "7"},
            {"topic": "orders.paid", "payload": {"i": 1}, "key": "7"},
            {"topic": "orders.created", "payload": {"i": 2}, "key": "8"},
            {"topic": "audit.x", "payload": {"i": 3}},
        ],
    )

    # No OUTBOX_KAFKA_BOOTSTRAP_SERVERS: the file's [kafka] section must be enough.
    with start_relay("--config", config, env={"OUTBOX_DATABASE_URL": database_url}) as relay:
        records = consume_all(kafka.bootstrap, topic_name, expected=3, timeout=20)
        assert sorted(_index(r) for r in records) == [0, 1, 2], relay.output
        assert {(r.header("outbox-topic"), _index(r)) for r in records} == {
            (b"orders.created", 0), (b"orders.paid", 1), (b"orders.created", 2),
        }  # fmt: skip
        _wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM outbox.dead_letter") == 1,
            10,
            "the unroutable message to be dead-lettered",
        )
        assert relay.stop() == 0, relay.output

    assert consume_for(kafka.bootstrap, "audit.x", 0.3) == []
    dead = query(database_url, "SELECT topic, reason, payload FROM outbox.dead_letter")
    assert len(dead) == 1
    topic, reason, payload = dead[0]
    assert topic == "audit.x"
    assert reason == "no route"
    assert json.loads(bytes(payload)) == {"i": 3}
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.delivery") == 3

    status = run_cli("status", "--json", env={"OUTBOX_DATABASE_URL": database_url})

    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["topics"]["audit.x"] == {
        "pending": 0, "dead": 1, "oldest_pending_age_seconds": None,
    }  # fmt: skip


def test_run_logs_a_topic_that_matches_no_route(
    database_url: str, kafka: KafkaEndpoint, topic_name: str, tmp_config: Callable[..., Path]
) -> None:
    migrate(database_url)
    config = _routes_config(tmp_config, kafka.bootstrap, topic_name)
    [msg_id] = publish_many(database_url, [{"topic": "audit.x", "payload": {"i": 0}}])

    with start_relay("--config", config, env={"OUTBOX_DATABASE_URL": database_url}) as relay:
        _wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM outbox.dead_letter") == 1,
            10,
            "the unroutable message to be dead-lettered",
        )
        assert relay.stop() == 0

    logged = [line for line in relay.output.splitlines() if "audit.x" in line]
    assert len(logged) == 1, relay.output
    assert " ERROR " in logged[0], relay.output
    assert logged[0].endswith(
        f": topic 'audit.x' matches no route: message {msg_id} dead-lettered "
        "(add a route, then retry it)"
    ), relay.output


def test_run_on_an_unmigrated_database_says_to_migrate(
    database_url: str, kafka: KafkaEndpoint
) -> None:
    result = run_cli("run", env=_relay_env(database_url, kafka.bootstrap), timeout=60)

    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox-relay: error:")
    assert "outbox-relay migrate" in lines[0]
    assert "Traceback" not in result.stderr
    assert scalar(database_url, "SELECT to_regnamespace('outbox') IS NULL") is True


def test_run_on_an_outdated_schema_names_both_versions(
    database_url: str, kafka: KafkaEndpoint
) -> None:
    migrate(database_url)
    execute(database_url, "DELETE FROM outbox.schema_migrations WHERE version > 1")

    result = run_cli("run", env=_relay_env(database_url, kafka.bootstrap), timeout=60)

    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"at version 1, this relay needs {SCHEMA_VERSION}" in lines[0]
    assert "outbox-relay migrate" in lines[0]


NEWER_FORMAT = (
    "CREATE OR REPLACE FUNCTION outbox.relay_format() RETURNS integer LANGUAGE sql "
    f"AS $$ SELECT {RELAY_FORMAT + 1} $$"
)


def test_run_on_a_schema_migrated_for_newer_relays_refuses_to_start(
    database_url: str, kafka: KafkaEndpoint
) -> None:
    migrate(database_url)
    execute(database_url, NEWER_FORMAT)

    result = run_cli("run", env=_relay_env(database_url, kafka.bootstrap), timeout=60)

    assert result.returncode == 1, result.stderr
    [line] = error_lines(result.stderr)
    assert f"was migrated for a newer outbox-relay (first-pass format {RELAY_FORMAT + 1};" in line
    assert "upgrade the relay" in line
    assert scalar(database_url, "SELECT count(*) FROM outbox.relay") == 0


def test_a_running_relay_stops_when_the_schema_is_migrated_for_newer_relays(
    database_url: str, kafka: KafkaEndpoint
) -> None:
    """What an old pod does when `migrate` of a release with another first pass runs under
    it: it stops claiming, hands back what it holds and exits 1, naming the reason."""
    migrate(database_url)
    topic = f"format-{time.monotonic_ns()}"
    create_topic(kafka.bootstrap, topic)
    env = {**_relay_env(database_url, kafka.bootstrap), "OUTBOX_HEARTBEAT_SECONDS": "0.2"}
    with start_relay(env=env) as relay:
        publish_many(database_url, [{"topic": topic, "payload": {"i": i}} for i in range(3)])
        _wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox.message") == 0,
                    30, "the relay to deliver the first messages")  # fmt: skip
        execute(database_url, NEWER_FORMAT)
        assert relay.wait_for(r"stopping: schema 'outbox' was migrated for a newer", 10)
        code = relay.popen.wait(15)
        publish_many(database_url, [{"topic": topic, "payload": {"i": i}} for i in (3, 4)])

    assert code == 1, relay.output
    assert "upgrade the relay" in error_lines(relay.output)[-1]
    assert "Traceback" not in relay.output
    # Nothing it held is left leased, and nothing published after it stopped was sent.
    assert scalar(database_url, "SELECT count(*) FROM outbox.relay") == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 2
    assert len(consume_all(kafka.bootstrap, topic, 3)) == 3


def test_run_without_kafka_or_routes_is_a_usage_error(database_url: str) -> None:
    migrate(database_url)

    result = run_cli("run", env=_relay_env(database_url))

    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox-relay: error:")
    assert lines[0] == (
        "outbox-relay: error: no routes: set OUTBOX_KAFKA_BOOTSTRAP_SERVERS (every topic to "
        "Kafka) or add [[routes]] to the config file"
    )


@pytest.mark.parametrize(
    ("producer", "named"),
    [
        ('"enable.idempotence" = "maybe"', "enable.idempotence"),
        ('"acks" = 0', "acks"),
        ('"no.such.property" = 1', "no.such.property"),
        ('"message.max.bytes" = 1', "message.max.bytes"),
    ],
)
def test_a_producer_configuration_librdkafka_refuses_stops_the_relay_at_start(
    database_url: str, tmp_config: Callable[..., Path], producer: str, named: str
) -> None:
    migrate(database_url)
    kafka = '[kafka]\nbootstrap_servers = "127.0.0.1:1"\n'
    config = tmp_config(f"{kafka}[kafka.producer]\n{producer}\n")
    result = run_cli(
        "run",
        "--config",
        str(config),
        "--metrics-port",
        "0",
        env={"OUTBOX_DATABASE_URL": database_url},
        timeout=30,
    )

    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox-relay: error: config [kafka.producer]: librdkafka refuses")
    assert named in lines[0]
    assert "started" not in result.stderr + result.stdout, "never served /healthz"
    assert "Traceback" not in result.stderr


def test_sigterm_while_waiting_for_the_database_exits_0() -> None:
    with socket.socket() as silent:  # accepts nothing: the relay waits for its connection
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        port = silent.getsockname()[1]
        relay = RelayProcess(
            start_cli(
                "run",
                env={
                    "OUTBOX_DATABASE_URL": f"postgresql://u@127.0.0.1:{port}/x",
                    "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                },
            )
        )
        time.sleep(1.5)  # well into the wait for the database (30 s)
        code = relay.stop(signal.SIGTERM, timeout=15)

    assert code == 0, relay.output
    assert "stopped before start-up finished" in relay.output
    assert "Traceback" not in relay.output
