"""docs/quickstart.md, step by step, for real: ``outbox-relay migrate``, the example app
publishing, ``outbox-relay run`` delivering to Kafka, the example reading it back, ``status``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acceptance.cli import cli_env, run_cli, start_relay
from tests.harness.examples import EXAMPLES
from tests.harness.kafka import KafkaEndpoint, consume_all, consume_for
from tests.harness.relay import wait_until

pytestmark = pytest.mark.integration

QUICKSTART = EXAMPLES / "quickstart.py"


def example(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(QUICKSTART), *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def pending(env: dict[str, str], topic: str) -> int:
    """``status --json``'s pending count; a topic with nothing pending or dead is not listed."""
    status = run_cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    return int(json.loads(status.stdout)["topics"].get(topic, {}).get("pending", 0))


def test_quickstart_runs_end_to_end(
    database_url: str, kafka: KafkaEndpoint, topic_name: str
) -> None:
    env = {
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "OUTBOX_POLL_INTERVAL": "0.2",
    }
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr

    published = example("publish", "--topic", topic_name, env=env)
    assert published.returncode == 0, published.stderr
    lines = published.stdout.splitlines()
    first_id = lines[0].rsplit(" ", 1)[-1]
    assert "order 3 rolled back" in lines[2]
    assert f"message {first_id}, no second delivery" in lines[3]
    assert pending(env, topic_name) == 2

    with start_relay(env=env) as relay:
        read = example("read", "--topic", topic_name, "--expect", "2", env=env)
        assert read.returncode == 0, read.stdout + read.stderr
        assert "idempotency-key=order-1-created" in read.stdout
        assert "idempotency-key=order-2-created" in read.stdout
        wait_until(lambda: pending(env, topic_name) == 0, 30, "status to show nothing pending")
        assert relay.stop() == 0

    records = consume_all(kafka.bootstrap, topic_name, expected=2)
    assert [r.header("idempotency-key") for r in records] == [
        b"order-1-created",
        b"order-2-created",
    ]
    assert {r.key for r in records} == {b"acme"}
    assert json.loads(records[0].value) == {"order_id": 1, "customer": "acme", "total": "12.50"}
    # The rolled-back order 3 and the second publish of order 1 never arrive.
    assert len(consume_for(kafka.bootstrap, topic_name, 1.0)) == 2
