"""``outbox-relay status --json`` has exactly the contract's shape."""

from __future__ import annotations

import json

from relay.status import TopicStatus, to_json


def test_to_json_has_the_contract_shape() -> None:
    report = {
        "billing.due": TopicStatus(pending=0, dead=2, oldest_pending_age_seconds=None),
        "orders.created": TopicStatus(pending=5, dead=0, oldest_pending_age_seconds=12.5),
    }
    document = json.loads(to_json(report))
    assert document == {
        "topics": {
            "billing.due": {"pending": 0, "dead": 2, "oldest_pending_age_seconds": None},
            "orders.created": {"pending": 5, "dead": 0, "oldest_pending_age_seconds": 12.5},
        }
    }
    for entry in document["topics"].values():
        assert type(entry["pending"]) is int
        assert type(entry["dead"]) is int
        assert entry["oldest_pending_age_seconds"] is None or isinstance(
            entry["oldest_pending_age_seconds"], float
        )


def test_empty_report_is_an_empty_topics_object() -> None:
    assert json.loads(to_json({})) == {"topics": {}}
