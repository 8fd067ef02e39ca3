"""``python -m relay.sample_app``: the docker-compose stack's order app, on a real database.

Each order and its ``orders.created`` message commit together; ids come from a sequence, so
a second run goes on numbering; SIGTERM stops it cleanly with exit code 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "orders.created"


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return {**env, "OUTBOX_DATABASE_URL": url}


def sample_app(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.sample_app", *args],
        cwd=ROOT, env=_env(url), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


Message = tuple[str, bytes, str, dict[str, object]]


def orders_and_messages(url: str) -> tuple[list[int], list[Message]]:
    with psycopg.connect(url) as conn:
        orders = [row[0] for row in conn.execute("SELECT id FROM public.orders ORDER BY id")]
        messages = conn.execute(
            "SELECT topic, msg_key, idempotency_key, convert_from(payload, 'UTF8')::jsonb"
            " FROM outbox.message ORDER BY seq"
        ).fetchall()
    return orders, [(t, bytes(k), i, p) for t, k, i, p in messages]


def test_writes_count_orders_each_with_its_message(url: str) -> None:
    done = sample_app(url, "--count", "20")
    assert done.returncode == 0, done.stderr
    assert "20 orders written" in done.stdout
    orders, messages = orders_and_messages(url)
    assert len(orders) == 20 and len(set(orders)) == 20
    assert len(messages) == 20
    assert {topic for topic, *_ in messages} == {TOPIC}
    by_order = {payload["order_id"]: (key, idem) for _, key, idem, payload in messages}
    assert set(by_order) == set(orders)
    for order_id, (key, idem) in by_order.items():
        assert idem == f"order-{order_id}-created"
        assert key.decode().startswith("customer-")


def test_a_second_run_goes_on_numbering(url: str) -> None:
    assert sample_app(url, "--count", "3", "--rate", "0").returncode == 0
    assert sample_app(url, "--count", "4", "--rate", "0").returncode == 0
    orders, messages = orders_and_messages(url)
    assert len(orders) == len(set(orders)) == len(messages) == 7


def test_sigterm_stops_it_with_exit_0_and_nothing_half_written(url: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.sample_app", "--rate", "50"],
        cwd=ROOT, env=_env(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(orders_so_far(url)) < 5:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    orders, messages = orders_and_messages(url)
    assert len(orders) >= 5
    assert len(messages) == len(orders)
    assert f"{len(orders)} orders written" in out


def orders_so_far(url: str) -> list[int]:
    """Order ids so far; none while the app has not created its table yet."""
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('public.orders')").fetchone() == (None,):
            return []
        return [row[0] for row in conn.execute("SELECT id FROM public.orders")]


def test_bad_arguments_exit_2(url: str) -> None:
    done = sample_app(url, "--rate", "fast")
    assert done.returncode == 2
    assert "--rate" in done.stderr


def test_an_unmigrated_database_says_to_migrate(database_url: str) -> None:
    done = sample_app(database_url, "--count", "1")
    assert done.returncode == 1
    assert "outbox-relay migrate" in done.stderr
