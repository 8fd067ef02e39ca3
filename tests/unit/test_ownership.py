"""The rebalance plan: even spread, minimal movement, handoffs only through the holder."""

from __future__ import annotations

import itertools
import random

import pytest

from relay.ownership import BUCKETS, Lease, Moves, fair_shares, rebalance, spread


def table(holders: list[str | None]) -> list[Lease]:
    return [Lease(b, h) for b, h in enumerate(holders)]


def apply(leases: list[Lease], moves: Moves, live: set[str]) -> list[Lease]:
    """The table after these moves and after every holder completed its handoffs."""
    out = []
    for lease in leases:
        holder, successor = lease.holder, lease.successor
        if lease.bucket in moves.assign:
            holder, successor = moves.assign[lease.bucket], None
        elif lease.bucket in moves.successors:
            successor = moves.successors[lease.bucket]
        if successor is not None and successor in live:
            holder, successor = successor, None
        out.append(Lease(lease.bucket, holder, successor))
    return out


def counts(leases: list[Lease]) -> dict[str, int]:
    return spread(lease.holder for lease in leases)


def test_a_single_relay_takes_every_free_bucket_at_once() -> None:
    moves = rebalance(table([None] * BUCKETS), ["a"])
    assert moves.assign == dict.fromkeys(range(BUCKETS), "a")
    assert moves.successors == {}


def test_a_joining_relay_gets_buckets_only_through_handoffs() -> None:
    leases = table(["a"] * BUCKETS)
    moves = rebalance(leases, ["a", "b"])
    assert moves.assign == {}
    assert sorted(moves.successors.values()) == ["b"] * 128
    assert counts(apply(leases, moves, {"a", "b"})) == {"a": 128, "b": 128}


def test_an_expired_holder_loses_its_buckets_at_once() -> None:
    leases = [Lease(b, "a" if b < 128 else "dead", expired=b >= 128) for b in range(BUCKETS)]
    moves = rebalance(leases, ["a", "b"])
    assert set(moves.assign) == set(range(128, BUCKETS))
    assert set(moves.assign.values()) == {"b"}
    assert moves.successors == {}


def test_a_balanced_table_needs_no_moves() -> None:
    leases = table([("a", "b", "c")[b % 3] for b in range(BUCKETS)])
    assert not rebalance(leases, ["a", "b", "c"])


def test_pending_handoffs_count_for_their_successor() -> None:
    leases = table(["a"] * BUCKETS)
    first = rebalance(leases, ["a", "b"])
    marked = [
        Lease(lease.bucket, lease.holder, first.successors.get(lease.bucket)) for lease in leases
    ]
    assert not rebalance(marked, ["a", "b"])


def test_a_handoff_to_a_relay_that_died_is_redirected() -> None:
    leases = [Lease(b, "a", "gone" if b < 100 else None) for b in range(BUCKETS)]
    moves = rebalance(leases, ["a", "b"])
    after = apply(leases, moves, {"a", "b"})
    assert counts(after) == {"a": 128, "b": 128}
    assert all(lease.successor != "gone" for lease in after)


def test_fair_shares_give_the_extra_buckets_to_those_holding_most() -> None:
    assert fair_shares({"a": 200, "b": 56, "c": 0}, 256) == {"a": 86, "b": 85, "c": 85}
    assert fair_shares({"a": 0, "b": 0, "c": 10}, 256) == {"a": 85, "b": 85, "c": 86}


@pytest.mark.parametrize("seed", range(40))
def test_any_table_converges_to_an_even_spread_in_one_round(seed: int) -> None:
    rng = random.Random(seed)
    relays = [f"r{i}" for i in range(rng.randint(1, 30))]
    live = set(rng.sample(relays, rng.randint(1, len(relays))))
    leases = [
        Lease(
            b,
            rng.choice([*relays, None]),
            rng.choice([None, None, *relays]),
            expired=rng.random() < 0.1,
        )
        for b in range(BUCKETS)
    ]
    moves = rebalance(leases, live)
    after = apply(leases, moves, live)
    held = counts(after)
    assert set(held) <= live
    assert sum(held.values()) == BUCKETS
    share = [held.get(relay, 0) for relay in live]
    assert max(share) - min(share) <= 1
    assert not rebalance(after, live), "a second round must find nothing to do"


def test_a_live_holders_bucket_never_changes_holder_directly() -> None:
    for holders in itertools.product(["a", "b", None], repeat=4):
        leases = table(list(holders) * (BUCKETS // 4))
        moves = rebalance(leases, ["a", "b", "c"])
        for bucket in moves.assign:
            assert leases[bucket].holder is None


def test_adding_a_relay_moves_only_its_share() -> None:
    leases = table([("a", "b")[b % 2] for b in range(BUCKETS)])
    moves = rebalance(leases, ["a", "b", "c"])
    assert len([s for s in moves.successors.values() if s is not None]) == 85
