"""Who should hold which key bucket: the pure part of the bucket leases.

Given the lease table and the live relays, :func:`rebalance` says which free buckets to
assign and which held buckets to hand over, so that every live relay holds its fair share
(the counts differ by at most one) while as few buckets as possible move.

A bucket is *free* when nobody holds it or its holder's lease has expired (the relay
crashed or lost the database): it gets a new holder at once. A bucket held by a live
relay never changes holder here; the holder is asked to hand it over (``successor``) and
does so only once no batch of its own is in flight. That draining handoff is what keeps two
relays from ever delivering one key at the same time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BUCKETS = 256


@dataclass(frozen=True, slots=True)
class Lease:
    """One row of ``bucket_lease`` as the rebalance sees it."""

    bucket: int
    holder: str | None
    successor: str | None = None
    expired: bool = False


@dataclass
class Moves:
    """What one rebalance writes."""

    assign: dict[int, str] = field(default_factory=dict)
    """Free bucket -> its new holder (takes effect at once)."""

    successors: dict[int, str | None] = field(default_factory=dict)
    """Held bucket -> the relay it should be handed to (None: cancel a pending handoff)."""

    def __bool__(self) -> bool:
        return bool(self.assign or self.successors)


def fair_shares(counts: dict[str, int], total: int) -> dict[str, int]:
    """Each relay's quota: ``total // n``, plus one for the relays that already hold most."""
    if not counts:
        return {}
    base, extra = divmod(total, len(counts))
    order = sorted(counts, key=lambda relay: (-counts[relay], relay))
    return {relay: base + (1 if rank < extra else 0) for rank, relay in enumerate(order)}


def rebalance(leases: Sequence[Lease], live: Iterable[str]) -> Moves:
    """The moves that bring the lease table to an even spread over ``live`` relays."""
    alive = sorted(set(live))
    moves = Moves()
    if not alive:
        return moves
    owner: dict[int, str] = {}  # where each held bucket ends up once handoffs complete
    free: list[int] = []
    for lease in leases:
        if lease.holder not in alive or lease.expired:
            free.append(lease.bucket)
            continue
        successor = lease.successor if lease.successor in alive else None
        if lease.successor is not None and successor is None:
            moves.successors[lease.bucket] = None  # its successor died: the holder keeps it
        owner[lease.bucket] = successor or str(lease.holder)
    counts = dict.fromkeys(alive, 0)
    for relay in owner.values():
        counts[relay] += 1
    quota = fair_shares(counts, len(leases))
    pool = sorted(free)
    for relay in alive:
        surplus = counts[relay] - quota[relay]
        if surplus > 0:
            mine = sorted((b for b, r in owner.items() if r == relay), reverse=True)
            pool.extend(mine[:surplus])
    by_bucket = {lease.bucket: lease for lease in leases}
    for relay in alive:
        while counts[relay] < quota[relay] and pool:
            bucket = pool.pop(0)
            counts[relay] += 1
            _move(moves, by_bucket[bucket], relay, bucket in free)
    return moves


def _move(moves: Moves, lease: Lease, to: str, free: bool) -> None:
    if free:
        moves.assign[lease.bucket] = to
        moves.successors.pop(lease.bucket, None)
    elif lease.holder == to:
        if lease.successor is not None:
            moves.successors[lease.bucket] = None  # back to its holder: cancel the handoff
    elif lease.successor != to:
        moves.successors[lease.bucket] = to


def spread(holders: Iterable[str | None]) -> dict[str, int]:
    """Buckets per holder (for status and tests)."""
    counts: dict[str, int] = {}
    for holder in holders:
        if holder is not None:
            counts[holder] = counts.get(holder, 0) + 1
    return counts
