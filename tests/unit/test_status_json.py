"""``outbox-relay status --json`` has the contract's shape, plus ``routes`` and ``relays``."""

from __future__ import annotations

import datetime as dt
import json

from relay.routestate import RouteStatus
from relay.status import RelayStatus, Report, TopicStatus, ranges, to_json

BEAT = dt.datetime(2026, 11, 21, 10, 0, 0, tzinfo=dt.UTC)


def test_to_json_has_the_contract_shape() -> None:
    report = Report(
        {
            "billing.due": TopicStatus(pending=0, dead=2, oldest_pending_age_seconds=None),
            "orders.created": TopicStatus(pending=5, dead=0, oldest_pending_age_seconds=12.5),
        }
    )
    document = json.loads(to_json(report))
    assert document["topics"] == {
        "billing.due": {"pending": 0, "dead": 2, "oldest_pending_age_seconds": None},
        "orders.created": {"pending": 5, "dead": 0, "oldest_pending_age_seconds": 12.5},
    }
    for entry in document["topics"].values():
        assert type(entry["pending"]) is int
        assert type(entry["dead"]) is int
        assert entry["oldest_pending_age_seconds"] is None or isinstance(
            entry["oldest_pending_age_seconds"], float
        )


def test_empty_report_has_empty_topics_routes_and_relays() -> None:
    document = json.loads(to_json(Report({})))
    assert document["topics"] == {}
    assert document["routes"] == {}
    assert document["relays"] == []


def test_routes_have_state_disabled_at_reason_pending_and_dead() -> None:
    routes = {
        "billing-hook": RouteStatus(BEAT, "endpoint gone (HTTP 410); route disabled", 0, 4),
        "orders-to-kafka": RouteStatus(pending=7),
    }
    document = json.loads(to_json(Report({}, routes=routes)))
    assert document["routes"] == {
        "billing-hook": {
            "state": "disabled",
            "disabled_at": BEAT.isoformat(),
            "reason": "endpoint gone (HTTP 410); route disabled",
            "pending": 0,
            "dead": 4,
        },
        "orders-to-kafka": {
            "state": "enabled", "disabled_at": None, "reason": None, "pending": 7, "dead": 0,
        },
    }  # fmt: skip
    assert list(document) == ["topics", "routes", "relays", "unowned_buckets"]


def test_only_disabled_or_busy_routes_are_notable() -> None:
    assert RouteStatus(BEAT).notable
    assert RouteStatus(pending=1).notable
    assert RouteStatus(dead=1).notable
    assert not RouteStatus().notable


def test_relays_list_names_id_host_pid_buckets_and_last_heartbeat() -> None:
    relay = RelayStatus("h:1:ab", "h", 1, BEAT, BEAT, 0.5, (0, 1, 2), (2,))
    [entry] = json.loads(to_json(Report({}, [relay])))["relays"]
    assert entry["id"] == "h:1:ab"
    assert entry["host"] == "h"
    assert entry["pid"] == 1
    assert entry["buckets"] == [0, 1, 2]
    assert dt.datetime.fromisoformat(entry["last_heartbeat"]) == BEAT
    assert entry["handing_over"] == [2]


def test_bucket_ranges_are_compact() -> None:
    assert ranges((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert ranges((3,)) == "3"
    assert ranges(()) == "-"
