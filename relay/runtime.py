"""A configured route at run time: its sink, retry schedule, pause and disabled state."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from .backoff import Backoff
from .config import Route
from .plan import DISABLED, NO_ROUTE, RecordPlan
from .sinks.base import SHUTDOWN, Failed, Outbound, Result, Sink

log = logging.getLogger("relay.engine")

# Longest Retry-After honoured: an endpoint asking for more is retried after a day.
MAX_RETRY_AFTER = 86400.0

# Pauses of a route whose sink is unreachable (broker down, endpoint refusing connections).
OUTAGE_BACKOFF = Backoff(initial=0.5, maximum=30.0)
# How long after its pause an unanswered outage still makes the relay unready: long enough
# for the next attempt to answer, short enough that an outage nobody retries is forgotten.
OUTAGE_SETTLE = 5.0


def _outage(result: Result) -> TypeGuard[Failed]:
    """A failure saying the sink cannot be reached (a stopping relay's give-up is not one)."""
    return isinstance(result, Failed) and result.kind == "unavailable" and result.reason != SHUTDOWN


@dataclass
class RouteRuntime:
    """A route with its sink, retry schedule, outage pause and disabled state."""

    route: Route
    sink: Sink
    backoff: Backoff
    failures: int = 0
    paused_until: float = 0.0
    # Why the route is disabled (HTTP 410, an operator), or None; its messages are
    # dead-lettered until an operator enables it again.
    disabled: str | None = None
    # A disable decided here (HTTP 410) that is not yet known to be in route_state, and when
    # it was last written there: a read of route_state that began before that write cannot
    # be trusted to undo it.
    unsaved_disable: str | None = None
    disable_saved_at: float = 0.0
    # Why the sink is unreachable (broker down, connection refused), or None: the route is
    # not ready (``/readyz``) until a delivery succeeds again.
    outage: str | None = None
    # A send the first pass stopped waiting for (no answer within hold_seconds): nothing
    # more is sent on the route until it ends.
    unanswered: asyncio.Future[Any] | None = None

    @property
    def busy(self) -> bool:
        """A send given up on is still running."""
        return self.unanswered is not None and not self.unanswered.done()

    @property
    def is_lane(self) -> bool:
        """Delivered by its own lane (:mod:`relay.lanes`) rather than in the first pass."""
        return self.route.sink == "webhook"

    def disable(self, reason: str) -> None:
        """Stop sending at once; the disable is saved to ``route_state`` next."""
        self.disabled = self.unsaved_disable = reason

    def disable_saved(self) -> None:
        self.unsaved_disable = None  # an operator may enable it from now on
        self.disable_saved_at = time.monotonic()

    def learn(self, reason: str | None, read_started: float) -> bool:
        """Take the state ``route_state`` showed in a read begun at ``read_started``.

        Returns whether the state changed. A disable made here is kept until that read can
        have seen it, so a refresh racing the write never turns the route back on.
        """
        if reason == self.disabled:
            return False
        if reason is None and (self.unsaved_disable or self.disable_saved_at >= read_started):
            return False
        self.disabled = reason
        return True

    def pause_left(self) -> float:
        return max(0.0, self.paused_until - time.monotonic())

    def observe(self, results: Sequence[Result]) -> None:
        """Pause the route while its sink is unreachable; resume on the first success."""
        down = next((r for r in results if _outage(r)), None)
        if down is not None:
            self.outage = down.reason
            self._pause(None)
        elif results:
            self.failures = 0
            self.paused_until = 0.0
            self.outage = None

    def observe_endpoint(self, result: Result) -> None:
        """One webhook answer: an endpoint-wide failure (refused, 429) pauses the route for
        its ``Retry-After`` or the outage backoff, whichever is longer."""
        if isinstance(result, Failed):
            if result.scope == "endpoint" and result.kind == "retry":
                if not result.reason.startswith("HTTP"):  # 429 is an answer, not an outage
                    self.outage = result.reason
                self._pause(result.retry_after)
            return
        self.failures = 0
        self.paused_until = 0.0
        self.outage = None

    def unreachable(self) -> str | None:
        """Why the sink is unreachable, while the route waits it out and for
        :data:`OUTAGE_SETTLE` seconds after (no attempt may come to clear it: no traffic, or
        its messages went to another relay); None otherwise."""
        if self.outage is None or time.monotonic() > self.paused_until + OUTAGE_SETTLE:
            return None
        return self.outage

    def _pause(self, at_least: float | None) -> None:
        if self.pause_left() > 0:
            return  # requests already in flight when the pause began: one outage, one step
        self.failures += 1
        delay = max(min(OUTAGE_BACKOFF.delay(self.failures), self.route.max_backoff), at_least or 0)
        self.paused_until = time.monotonic() + min(delay, MAX_RETRY_AFTER)


def log_dead_letters(plan: RecordPlan, messages: dict[int, Outbound]) -> None:
    """Every dead letter is logged where it is decided: an operator must see it. Those of a
    disabled route, already announced when it was disabled, are summed up per route."""
    disabled: Counter[str] = Counter()
    for rows in (plan.finished_dead, plan.dead):
        columns = rows.columns
        for seq, route, reason, error in zip(
            columns.get("seq", []), columns.get("route", []),
            columns.get("reason", []), columns.get("error", []), strict=True,
        ):  # fmt: skip
            message = messages[int(str(seq))]
            if route == NO_ROUTE:
                log.error(
                    "topic %r matches no route: message %s dead-lettered "
                    "(add a route, then retry it)",
                    message.topic,
                    message.id,
                )
            elif reason == DISABLED:
                disabled[str(route)] += 1
            else:
                log.warning(
                    "message %s (topic %r) dead-lettered on route %s: %s",
                    message.id,
                    message.topic,
                    route,
                    error or reason,
                )
    for route, count in disabled.items():
        log.warning("route %s is disabled: %d message(s) dead-lettered", route, count)


async def wait_any(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    """Sleep up to ``timeout``; return early when ``stop`` or ``wake`` is set."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
