"""Bucket leases against a real PostgreSQL: join, handoff, leave, expiry, fencing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from relay.membership import Membership, application_name
from tests.harness.relay import scalar

pytestmark = pytest.mark.integration

Scenario = Callable[[Callable[[str], Membership]], Awaitable[None]]


def run(url: str, scenario: Scenario) -> None:
    """Run ``scenario(make)`` where ``make(relay_id)`` gives a Membership; close them all."""
    made: list[Membership] = []

    def make(relay_id: str) -> Membership:
        member = Membership(url, "outbox", relay_id, lease_seconds=5.0, heartbeat_seconds=1.0)
        made.append(member)
        return member

    async def main() -> None:
        try:
            await scenario(make)
        finally:
            for member in made:
                await member.close()

    asyncio.run(main())


def holder_counts(url: str) -> dict[str, Any]:
    return dict(
        scalar(
            url,
            "SELECT coalesce(json_object_agg(h, n), '{}') FROM (SELECT coalesce(holder, '-') h,"
            " count(*) n FROM outbox.bucket_lease GROUP BY 1) s",
        )
    )


def expire_relays(url: str) -> None:
    """As if every relay had stopped heartbeating a second ago."""
    scalar(url, "UPDATE outbox.relay SET expires_at = now() - interval '1 s' RETURNING 1")


def test_a_lone_relay_holds_every_bucket(url: str) -> None:
    async def scenario(make: Callable[[str], Membership]) -> None:
        a = make("a")
        await a.heartbeat()
        assert a.buckets == frozenset(range(256))
        assert not a.handoff_due

    run(url, scenario)
    assert holder_counts(url) == {"a": 256}


def test_a_joining_relay_gets_buckets_only_when_the_holder_hands_them_over(url: str) -> None:
    async def scenario(make: Callable[[str], Membership]) -> None:
        a, b = make("a"), make("b")
        await a.heartbeat()
        await b.heartbeat()
        assert b.buckets == frozenset(), "nothing moves before the holder lets go"
        await a.heartbeat()
        assert len(a.draining) == 128 and a.handoff_due
        assert holder_counts(url) == {"a": 256}
        await a.hand_over()
        await b.heartbeat()
        assert len(a.buckets) == len(b.buckets) == 128
        assert not a.handoff_due

    run(url, scenario)


def test_heartbeats_and_handoffs_may_overlap_on_one_relay(url: str) -> None:
    async def scenario(make: Callable[[str], Membership]) -> None:
        a, b = make("a"), make("b")
        await a.heartbeat()
        for _ in range(10):
            await asyncio.gather(b.heartbeat(), a.heartbeat(), a.hand_over(), a.heartbeat())
        await a.hand_over()
        await asyncio.gather(a.heartbeat(), b.heartbeat())
        assert len(a.buckets) == len(b.buckets) == 128

    run(url, scenario)


def test_leaving_hands_every_bucket_to_the_others_at_once(url: str) -> None:
    async def scenario(make: Callable[[str], Membership]) -> None:
        a, b = make("a"), make("b")
        await a.heartbeat()
        await b.heartbeat()
        await a.heartbeat()
        await a.hand_over()
        await a.leave()
        await b.heartbeat()
        assert b.buckets == frozenset(range(256))

    run(url, scenario)
    assert scalar(url, "SELECT count(*) FROM outbox.relay") == 1


def test_an_expired_holder_is_replaced_and_its_sessions_are_ended(url: str) -> None:
    ghost_session = psycopg.connect(url, application_name=application_name("ghost"))

    async def scenario(make: Callable[[str], Membership]) -> None:
        ghost = make("ghost")
        await ghost.heartbeat()
        epochs = scalar(url, "SELECT sum(epoch) FROM outbox.bucket_lease")
        expire_relays(url)
        b = make("b")
        await b.heartbeat()
        assert b.buckets == frozenset(range(256))
        assert scalar(url, "SELECT sum(epoch) FROM outbox.bucket_lease") == epochs + 256

    try:
        run(url, scenario)
        with pytest.raises(psycopg.OperationalError):
            ghost_session.execute("SELECT 1")
    finally:
        ghost_session.close()
    assert scalar(url, "SELECT array_agg(relay_id) FROM outbox.relay") == ["b"]


def test_a_relay_whose_lease_lapsed_keeps_its_buckets_if_nobody_took_them(url: str) -> None:
    async def scenario(make: Callable[[str], Membership]) -> None:
        a = make("a")
        await a.heartbeat()
        expire_relays(url)
        await a.heartbeat()
        assert a.buckets == frozenset(range(256))
        assert scalar(url, "SELECT bool_and(expires_at > now()) FROM outbox.relay")
        assert scalar(url, "SELECT max(epoch) FROM outbox.bucket_lease") == 1, "no move"

    run(url, scenario)


def test_a_heartbeat_writes_one_row_however_many_buckets(url: str) -> None:
    versions = "SELECT array_agg(xmin::text ORDER BY bucket) FROM outbox.bucket_lease"

    async def scenario(make: Callable[[str], Membership]) -> None:
        a = make("a")
        await a.heartbeat()
        before = scalar(url, versions)
        for _ in range(5):
            await a.heartbeat()
        assert scalar(url, versions) == before, "a heartbeat must not rewrite the bucket rows"

    run(url, scenario)
