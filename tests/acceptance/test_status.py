"""``outbox-relay status [--json]`` (CONTRACT section 8)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.cli import error_lines, migrate, publish_many, run_cli, scalar, start_relay
from tests.harness.kafka import KafkaEndpoint

pytestmark = pytest.mark.acceptance

PENDING_ONLY = "alpha.orders"
DEAD_ONLY = "charlie.audit"
BOTH = "delta.mixed"


def _dead_letter_unroutable(
    database_url: str, bootstrap: str, tmp_config: Callable[..., Path], topics: list[str]
) -> None:
    """Publish ``topics`` (one message each) and let a relay whose only route matches none
    of them dead-letter them ("no route"); returns once it exited cleanly."""
    config = tmp_config(
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\n\n'
        '[[routes]]\nname = "elsewhere"\ntopics = ["elsewhere.*"]\nsink = "kafka"\n'
    )
    publish_many(database_url, [{"topic": t, "payload": {"n": n}} for n, t in enumerate(topics)])
    env = {"OUTBOX_DATABASE_URL": database_url}
    with start_relay("--config", str(config), env=env) as relay:
        deadline = time.monotonic() + 10
        while scalar(database_url, "SELECT count(*) FROM outbox.dead_letter") < len(topics):
            assert time.monotonic() < deadline, relay.output
            time.sleep(0.1)
        assert relay.stop() == 0, relay.output


def test_status_reports_pending_dead_and_age_per_topic(
    database_url: str, kafka: KafkaEndpoint, tmp_config: Callable[..., Path]
) -> None:
    migrate(database_url)
    _dead_letter_unroutable(database_url, kafka.bootstrap, tmp_config, [DEAD_ONLY, DEAD_ONLY, BOTH])
    before_publish = time.monotonic()
    publish_many(
        database_url,
        [{"topic": PENDING_ONLY, "payload": {"n": n}} for n in range(3)]
        + [{"topic": BOTH, "payload": {"n": 9}}],
    )
    time.sleep(0.05)  # so the pending age is measurably above zero
    env = {"OUTBOX_DATABASE_URL": database_url}

    result = run_cli("status", "--json", env=env)
    # The pending messages were published after ``before_publish``, and read before now.
    oldest_possible = time.monotonic() - before_publish

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"topics", "routes", "relays"}
    assert report["relays"] == []  # the relay that dead-lettered has stopped and left
    topics = report["topics"]
    assert set(topics) == {PENDING_ONLY, DEAD_ONLY, BOTH}
    for entry in topics.values():
        assert set(entry) == {"pending", "dead", "oldest_pending_age_seconds"}
        assert type(entry["pending"]) is int and type(entry["dead"]) is int
    assert topics[PENDING_ONLY]["pending"] == 3
    assert topics[PENDING_ONLY]["dead"] == 0
    assert topics[DEAD_ONLY] == {"pending": 0, "dead": 2, "oldest_pending_age_seconds": None}
    assert topics[BOTH]["pending"] == 1
    assert topics[BOTH]["dead"] == 1
    for topic in (PENDING_ONLY, BOTH):
        age = topics[topic]["oldest_pending_age_seconds"]
        assert type(age) is float
        assert 0.05 < age < oldest_possible

    table = run_cli("status", env=env)

    assert table.returncode == 0, table.stderr
    rows = {topic: _row(table.stdout, topic) for topic in topics}
    assert rows[PENDING_ONLY][:2] == ["3", "0"]
    assert rows[DEAD_ONLY][:2] == ["0", "2"]
    assert rows[BOTH][:2] == ["1", "1"]


def _row(table: str, topic: str) -> list[str]:
    """The cells after the topic name on the table line naming ``topic``."""
    lines = [line for line in table.splitlines() if topic in line]
    assert len(lines) == 1, table
    cells = re.findall(r"[^\s│┃|]+", lines[0])
    return cells[cells.index(topic) + 1 :]


def test_status_of_an_empty_outbox(database_url: str) -> None:
    migrate(database_url)

    result = run_cli("status", "--json", env={"OUTBOX_DATABASE_URL": database_url})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "topics": {}, "routes": {}, "relays": [], "unowned_buckets": 256,
    }  # fmt: skip


def test_status_of_a_custom_schema(database_url: str) -> None:
    migrate(database_url, schema="ops_outbox")
    scalar(database_url, "SELECT ops_outbox.publish('sql.topic', '{}'::jsonb)")

    result = run_cli(
        "status", "--json", "--schema", "ops_outbox", env={"OUTBOX_DATABASE_URL": database_url}
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["topics"]["sql.topic"]["pending"] == 1


def test_status_on_an_unmigrated_database_says_to_migrate(database_url: str) -> None:
    result = run_cli("status", "--json", env={"OUTBOX_DATABASE_URL": database_url})

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox-relay: error:")
    assert "outbox-relay migrate" in lines[0]
