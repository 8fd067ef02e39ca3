"""Turn per-(message, route) results into the database writes of one record transaction.

Pure logic, no I/O: the engine feeds it what the sinks said, the store executes the plan.

Per (message, route) the verdict is one of:

- delivered:   a row in ``delivery``
- dead:        a row in ``dead_letter`` (permanent failure, retries exhausted, no route)
- pending:     a row in ``route_pending`` with its next attempt time: a retry after backoff,
               a route that was unavailable (no attempt spent) or a message parked behind an
               earlier message of its key on that route

A message read on its first pass whose routes are all delivered or dead is deleted in one
statement together with writing those rows. Anything else becomes "fanned": the message
stays, its pending routes carry on (a route that was unavailable too: the first pass has
moved past it, and its retries wait for that route alone).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

from .sinks.base import SHUTDOWN, Delivered, Failed, Outbound, Result

NO_ROUTE = "no-route"
DISABLED = "route disabled"  # the reason of dead letters of a disabled route
PAUSED = "route paused"  # the status of a message not sent because its route is paused

# Statuses of verdicts that are no failure of the sink: parked or held behind an earlier
# message of the key, not sent while the route is paused, dead-lettered because the route is
# disabled, or given back unanswered because the relay is stopping.
NOT_ATTEMPTED = frozenset({None, "held", PAUSED, "disabled", SHUTDOWN})


@dataclass(frozen=True, slots=True)
class Pending:
    """The next state of a route that needs another pass."""

    attempts: int
    delay: float
    error: str | None
    unavailable: bool = False
    status: str | None = None


@dataclass(frozen=True, slots=True)
class Dead:
    attempts: int
    reason: str
    error: str | None
    status: str | None = None


Verdict = Delivered | Dead | Pending


@dataclass
class Rows:
    """Column arrays for one bulk statement (``unnest`` on the SQL side)."""

    columns: dict[str, list[object]] = field(default_factory=dict)

    def add(self, **values: object) -> None:
        for name, value in values.items():
            self.columns.setdefault(name, []).append(value)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))


@dataclass
class RecordPlan:
    """Everything one record transaction writes."""

    finished: list[int] = field(default_factory=list)
    finished_deliveries: Rows = field(default_factory=Rows)
    finished_dead: Rows = field(default_factory=Rows)
    deliveries: Rows = field(default_factory=Rows)
    dead: Rows = field(default_factory=Rows)
    pending: Rows = field(default_factory=Rows)
    pending_done: Rows = field(default_factory=Rows)
    fanned: list[int] = field(default_factory=list)
    delivered_count: int = 0
    dead_count: int = 0
    # Every (message, route, verdict) of the plan, for the metrics once it is recorded.
    outcomes: list[tuple[Outbound, str, Verdict]] = field(default_factory=list)

    @property
    def retried_seqs(self) -> list[int]:
        """Messages whose route just finished on the retry pass (may now be complete)."""
        return [seq for seq in self.pending_done.columns.get("seq", []) if isinstance(seq, int)]


def verdict(
    result: Result, prior_attempts: int, max_attempts: int, backoff: float, pause: float
) -> Verdict:
    """What to record for one send result.

    ``backoff`` is the delay before a counted retry; ``pause`` is how long the route rests
    after finding its sink unavailable (no attempt is spent on an outage).
    """
    if isinstance(result, Delivered):
        return result
    attempts = prior_attempts + 1
    error = _error_text(result)
    status = result.reason
    if result.kind == "permanent":
        return Dead(attempts, result.reason, error, status)
    if result.kind == "gone":
        return Dead(attempts, f"endpoint gone ({result.reason}); route disabled", error, status)
    if result.kind == "unavailable":
        return Pending(prior_attempts, pause, error, unavailable=True, status=status)
    if result.kind == "held":
        return Pending(prior_attempts, 0.0, None)
    if attempts >= max_attempts:
        return Dead(attempts, f"max attempts reached ({result.reason})", error, status)
    return Pending(attempts, backoff, error, status=status)


def _error_text(result: Failed) -> str:
    return f"{result.reason}: {result.detail}" if result.detail else result.reason


def parked() -> Pending:
    return Pending(0, 0.0, None)


def plan_first_pass(
    messages: Iterable[Outbound],
    verdicts: dict[tuple[int, str], Verdict],
    routes_of: dict[int, list[str]],
) -> RecordPlan:
    """Plan for messages read on their first pass (every route at once)."""
    plan = RecordPlan()
    # The common case inline: one route, delivered. The rest goes through _plan_message.
    outcomes, finished = plan.outcomes, plan.finished
    columns = plan.finished_deliveries.columns
    d_seq, d_route, d_attempts, d_partition, d_offset = (
        columns.setdefault(name, []) for name in ("seq", "route", "attempts", "partition", "offset")
    )
    delivered = 0
    for message in messages:
        seq = message.seq
        names = routes_of.get(seq, [])
        if len(names) == 1:
            route = names[0]
            v = verdicts[(seq, route)]
            if type(v) is Delivered:
                outcomes.append((message, route, v))
                finished.append(seq)
                d_seq.append(seq)
                d_route.append(route)
                d_attempts.append(1)
                d_partition.append(v.partition)
                d_offset.append(v.offset)
                delivered += 1
                continue
        mine = {name: verdicts[(seq, name)] for name in names}
        if not names:
            mine = {NO_ROUTE: Dead(0, "no route", f"no route matches topic {message.topic!r}")}
        _plan_message(plan, message, mine)
    plan.delivered_count += delivered
    return plan


def _plan_message(plan: RecordPlan, message: Outbound, mine: dict[str, Verdict]) -> None:
    plan.outcomes.extend((message, route, v) for route, v in mine.items())
    if all(isinstance(v, Delivered | Dead) for v in mine.values()):
        plan.finished.append(message.seq)
        for route, v in mine.items():
            _add(plan.finished_deliveries, plan.finished_dead, plan, message.seq, route, v, 1)
        return
    plan.fanned.append(message.seq)
    for route, v in mine.items():
        if isinstance(v, Pending):
            _add_pending(plan, message, route, v)
        else:
            _add(plan.deliveries, plan.dead, plan, message.seq, route, v, 1)


def plan_retry_pass(claimed: Iterable[tuple[Outbound, str]], verdicts: list[Verdict]) -> RecordPlan:
    """Plan for ``route_pending`` rows claimed for another attempt."""
    plan = RecordPlan()
    for (message, route), v in zip(claimed, verdicts, strict=True):
        plan.outcomes.append((message, route, v))
        if isinstance(v, Pending):
            _add_pending(plan, message, route, v)
            continue
        _add(plan.deliveries, plan.dead, plan, message.seq, route, v, message.attempts + 1)
        plan.pending_done.add(seq=message.seq, route=route)
    return plan


def _add(
    deliveries: Rows, dead: Rows, plan: RecordPlan, seq: int, route: str, v: Verdict, attempts: int
) -> None:
    if isinstance(v, Delivered):
        deliveries.add(
            seq=seq, route=route, attempts=attempts, partition=v.partition, offset=v.offset
        )
        plan.delivered_count += 1
    elif isinstance(v, Dead):
        dead.add(
            seq=seq, route=route, attempts=v.attempts, reason=v.reason, error=v.error,
            status=v.status,
        )  # fmt: skip
        plan.dead_count += 1


def _add_pending(plan: RecordPlan, message: Outbound, route: str, v: Pending) -> None:
    plan.pending.add(
        seq=message.seq,
        route=route,
        topic=message.topic,
        key=message.key,
        attempts=v.attempts,
        delay=dt.timedelta(seconds=v.delay),
        error=v.error,
        status=v.status,
    )
