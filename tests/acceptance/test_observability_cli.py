"""``outbox-relay run --metrics-port --log-format json`` as operators start it (CONTRACT 4, 7)."""

from __future__ import annotations

import json
import signal
import socket
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from tests.acceptance.cli import (
    error_lines,
    migrate,
    publish_many,
    run_cli,
    scalar,
    start_relay,
)
from tests.harness.kafka import KafkaEndpoint, consume_all, create_topic

pytestmark = pytest.mark.acceptance

PASSWORD = "pw-never-logged-51c"


def _with_password(url: str) -> str:
    """The same database with a password in the URL (trust auth ignores it)."""
    parts = urlsplit(url)
    if parts.password:
        pytest.skip("the test database URL has its own password")
    with psycopg.connect(url) as conn:
        user = conn.info.user
    host = parts.netloc.rpartition("@")[2]  # host:port, or empty for ?host=/socket/dir
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}"))


def test_run_serves_metrics_and_logs_json_lines_without_secrets(
    database_url: str, kafka: KafkaEndpoint, topic_name: str, free_port: int
) -> None:
    migrate(database_url)
    create_topic(kafka.bootstrap, topic_name)
    publish_many(database_url, [{"topic": topic_name, "payload": {"i": i}} for i in range(20)])
    env = {
        "OUTBOX_DATABASE_URL": _with_password(database_url),
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "OUTBOX_METRICS_PORT": str(free_port),
        "OUTBOX_METRICS_REFRESH_SECONDS": "0.5",
        "OUTBOX_LOG_FORMAT": "json",
    }
    with start_relay(env=env) as relay:
        assert relay.wait_for(r"started", 20), relay.output
        consume_all(kafka.bootstrap, topic_name, expected=20, timeout=30)
        base = f"http://127.0.0.1:{free_port}"
        metrics = httpx.get(f"{base}/metrics", timeout=5)
        health = httpx.get(f"{base}/healthz", timeout=5)
        code = relay.stop(signal.SIGTERM, timeout=15)
        output = relay.output
    assert code == 0, output
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert f'outbox_delivered_total{{route="kafka",topic="{topic_name}"}} 20.0' in metrics.text
    assert health.status_code == 200
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert lines, "the relay logged nothing"
    for entry in lines:
        assert {"ts", "level", "logger", "message"} <= entry.keys()
        assert entry["ts"].endswith("+00:00")
    started = next(e for e in lines if "started" in e["message"])
    assert f"metrics on port {free_port}" in started["message"]
    assert started["relay_id"] in started["message"]
    assert all(e.get("relay_id") == started["relay_id"] for e in lines[lines.index(started) :])
    assert PASSWORD not in output and PASSWORD not in metrics.text


def test_run_with_a_metrics_port_in_use_fails_with_one_line(
    database_url: str, kafka: KafkaEndpoint
) -> None:
    migrate(database_url)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "run",
            "--metrics-port",
            str(port),
            env={
                "OUTBOX_DATABASE_URL": database_url,
                "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            },
        )
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert lines[-1] == (
        f"outbox-relay: error: cannot serve metrics on port {port}: Address already in use"
    ), result.stderr
    assert "Traceback" not in result.stderr
    held = "SELECT count(*) FROM outbox.bucket_lease WHERE holder IS NOT NULL"
    assert scalar(database_url, held) == 0, "the buckets it took are given back at once"
    assert scalar(database_url, "SELECT count(*) FROM outbox.relay") == 0


@pytest.mark.parametrize("bad", ["-1", "70000", "http"])
def test_bad_metrics_port_is_a_usage_error(bad: str) -> None:
    result = run_cli("run", "--metrics-port", bad)
    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1
    assert "--metrics-port" in result.stderr


@pytest.mark.parametrize("bad", ["0", "soon", "-3s"])
def test_bad_metrics_refresh_is_a_usage_error(bad: str) -> None:
    result = run_cli("run", "--metrics-refresh-seconds", bad)
    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1
    assert "--metrics-refresh-seconds" in result.stderr
