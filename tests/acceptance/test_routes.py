"""``outbox-relay routes list|enable|disable`` and the routes section of ``status``."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.cli import (
    error_lines,
    execute,
    insert_dead_letter,
    migrate,
    query,
    run_cli,
)

pytestmark = pytest.mark.acceptance

HOOK = "billing-hook"
KAFKA = "orders-to-kafka"
GONE = "endpoint gone (HTTP 410); route disabled"


def _env(database_url: str, **more: str) -> dict[str, str | None]:
    return {"OUTBOX_DATABASE_URL": database_url, **more}


def _json(database_url: str, *args: str, **env: str) -> Any:
    result = run_cli(*args, "--json", env=_env(database_url, **env))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _ok(database_url: str, *args: str) -> str:
    result = run_cli(*args, env=_env(database_url))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.strip()


def _disabled_by_endpoint(database_url: str, route: str) -> None:
    """What a relay writes when the route's endpoint answers 410 Gone."""
    execute(
        database_url,
        "INSERT INTO outbox.route_state (route, disabled_at, disabled_reason)"
        " VALUES (%s, now(), %s)",
        (route, GONE),
    )


def _pending_row(database_url: str, route: str, seq: int) -> None:
    execute(
        database_url,
        "INSERT INTO outbox.route_pending (seq, route, topic, bucket) VALUES (%s, %s, 't', 0)",
        (seq, route),
    )


def test_routes_list_shows_every_route_of_the_database_and_the_config(
    database_url: str, tmp_config: Callable[..., Path]
) -> None:
    migrate(database_url)
    _disabled_by_endpoint(database_url, HOOK)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    insert_dead_letter(database_url, route="no-route", topic="audit.x", reason="no route")
    _pending_row(database_url, KAFKA, 1)
    _pending_row(database_url, KAFKA, 2)
    config = tmp_config(
        '[kafka]\nbootstrap_servers = "127.0.0.1:1"\n\n'
        f'[[routes]]\nname = "{KAFKA}"\ntopics = ["orders.*"]\nsink = "kafka"\n\n'
        '[[routes]]\nname = "audit"\ntopics = ["audit.*"]\nsink = "kafka"\n'
    )

    document = _json(database_url, "routes", "list", OUTBOX_CONFIG=str(config))

    routes = document["routes"]
    assert list(routes) == sorted([HOOK, KAFKA, "audit", "no-route"])
    hook = routes[HOOK]
    assert dt.datetime.fromisoformat(hook.pop("disabled_at")).tzinfo is not None
    assert hook == {"state": "disabled", "reason": GONE, "pending": 0, "dead": 1}
    enabled = {"state": "enabled", "disabled_at": None, "reason": None}
    assert routes[KAFKA] == enabled | {"pending": 2, "dead": 0}
    assert routes["audit"] == enabled | {"pending": 0, "dead": 0}, "configured, no rows yet"
    assert routes["no-route"] == enabled | {"pending": 0, "dead": 1}

    table = run_cli("routes", "list", "--config", str(config), env=_env(database_url))

    assert table.returncode == 0, table.stderr
    [hook_row] = [line for line in table.stdout.splitlines() if HOOK in line]
    assert "disabled" in hook_row and GONE in hook_row
    [kafka_row] = [line for line in table.stdout.splitlines() if KAFKA in line]
    assert "orders.*" in kafka_row and "kafka" in kafka_row and "enabled" in kafka_row


def test_routes_list_of_an_empty_outbox(database_url: str) -> None:
    migrate(database_url)

    assert _json(database_url, "routes", "list") == {"routes": {}}
    assert _ok(database_url, "routes", "list").startswith("(no routes")


def test_disable_then_enable_a_route(database_url: str) -> None:
    migrate(database_url)

    out = _ok(database_url, "routes", "disable", HOOK, "--reason", "endpoint migration")

    assert out == f"route {HOOK} disabled (disabled by operator: endpoint migration)"
    [(disabled_at, reason, changed_at)] = query(
        database_url,
        "SELECT disabled_at, disabled_reason, changed_at FROM outbox.route_state"
        " WHERE route = %(route)s",
        {"route": HOOK},
    )
    assert disabled_at is not None and changed_at is not None
    assert reason == "disabled by operator: endpoint migration"
    route = _json(database_url, "routes", "list")["routes"][HOOK]
    assert (route["state"], route["reason"]) == ("disabled", reason)

    assert _ok(database_url, "routes", "enable", HOOK) == f"route {HOOK} enabled"
    assert _json(database_url, "routes", "list")["routes"][HOOK] == {
        "state": "enabled", "disabled_at": None, "reason": None, "pending": 0, "dead": 0,
    }  # fmt: skip
    assert _ok(database_url, "routes", "enable", HOOK) == f"route {HOOK} was not disabled"
    assert _ok(database_url, "routes", "enable", "never-seen") == (
        "route never-seen was not disabled"
    )


def test_disable_without_a_reason_and_twice(database_url: str) -> None:
    migrate(database_url)
    _disabled_by_endpoint(database_url, HOOK)

    assert _ok(database_url, "routes", "disable", HOOK) == (
        f"route {HOOK} disabled (disabled by operator)"
    )
    assert query(database_url, "SELECT disabled_reason FROM outbox.route_state") == [
        ("disabled by operator",)
    ]


def test_enable_clears_a_route_disabled_by_its_endpoint(database_url: str) -> None:
    migrate(database_url)
    _disabled_by_endpoint(database_url, HOOK)

    assert _ok(database_url, "routes", "enable", HOOK) == f"route {HOOK} enabled"
    assert query(database_url, "SELECT disabled_at, disabled_reason FROM outbox.route_state") == [
        (None, None)
    ]


@pytest.mark.parametrize("action", ["enable", "disable"])
def test_no_route_cannot_be_enabled_or_disabled(database_url: str, action: str) -> None:
    migrate(database_url)

    result = run_cli("routes", action, "no-route", env=_env(database_url))

    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("outbox-relay: error:") and "no-route" in line
    assert query(database_url, "SELECT count(*) FROM outbox.route_state") == [(0,)]


def test_status_reports_routes_from_the_database(database_url: str) -> None:
    migrate(database_url)
    _disabled_by_endpoint(database_url, HOOK)
    insert_dead_letter(database_url, route=HOOK, topic="orders.created")
    _pending_row(database_url, KAFKA, 1)
    execute(
        database_url,
        "INSERT INTO outbox.route_state (route) VALUES ('re-enabled')",
    )

    report = _json(database_url, "status")

    assert set(report) >= {"topics", "routes", "relays"}
    assert report["topics"] == {
        "orders.created": {"pending": 0, "dead": 1, "oldest_pending_age_seconds": None}
    }
    routes = report["routes"]
    assert set(routes) == {HOOK, KAFKA, "re-enabled"}, "only routes the database knows of"
    for entry in routes.values():
        assert set(entry) == {"state", "disabled_at", "reason", "pending", "dead"}
        assert type(entry["pending"]) is int and type(entry["dead"]) is int
    assert routes[HOOK]["state"] == "disabled" and routes[HOOK]["reason"] == GONE
    assert routes[KAFKA] == {
        "state": "enabled", "disabled_at": None, "reason": None, "pending": 1, "dead": 0,
    }  # fmt: skip

    text = _ok(database_url, "status")

    [hook_row] = [line for line in text.splitlines() if HOOK in line]
    assert re.search(r"\bdisabled\b", hook_row) and GONE in hook_row
    assert any(KAFKA in line for line in text.splitlines())
    assert "re-enabled" not in text, "the table shows only routes worth a look"


def test_status_has_no_routes_table_when_all_is_well(database_url: str) -> None:
    migrate(database_url)
    execute(database_url, "INSERT INTO outbox.route_state (route) VALUES (%s)", (HOOK,))

    text = _ok(database_url, "status")

    assert HOOK not in text
    assert "routes" not in text
    assert _json(database_url, "status")["routes"][HOOK]["state"] == "enabled"
