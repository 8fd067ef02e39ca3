"""Lanes: a route that delivers at its own pace (webhooks).

The first pass only queues a message for a lane route (a ``route_pending`` row, due at once).
The lane claims due rows of its route with a lease (never an open transaction), sends them
with at most ``concurrency`` requests at once (and ``rate_limit_per_s``, if set), and records
the outcomes in small groups. One lane's slow or failing endpoint therefore never holds back
another route.

Per-key order: the claim never returns a row while an earlier row of its key on this route
is leased or waiting for its retry, and rows of one key claimed together are sent one after
another; when one fails, the rest of its key are put back behind it without an attempt spent.

A relay killed mid-request leaves its rows leased; they come back (same ``webhook-id``) when
its relay row expires, see ``claim_retry_pass``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from .errors import one_line
from .metrics import Metrics
from .plan import DISABLED, PAUSED, Dead, RecordPlan, Verdict, plan_retry_pass
from .runtime import RouteRuntime, log_dead_letters, wait_any
from .sinks.base import Failed, Outbound, Result
from .sinks.webhook import WebhookSink
from .store import DB_ERRORS, RECORD_BACKOFF, Store

log = logging.getLogger(__name__)

_FLUSH_SECONDS = 0.05
_FLUSH_ROWS = 500
_SLOW_CLAIM_SECONDS = 0.05
_ANALYZE_EVERY_SECONDS = 60.0


@dataclass
class LaneSettings:
    lease_seconds: float
    poll_interval: float
    shutdown_grace: float


@dataclass
class Lane:
    """Claims, sends and records the due work of one webhook route."""

    runtime: RouteRuntime
    sink: WebhookSink
    store: Store
    settings: LaneSettings
    judge: Callable[[Outbound, Result], Verdict]
    on_recorded: Callable[[RecordPlan], None]
    metrics: Metrics
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    _done: list[tuple[Outbound, Verdict]] = field(default_factory=list)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    _chains: set[asyncio.Task[None]] = field(default_factory=set)
    _limiter: AsyncLimiter | None = None
    _slots: asyncio.Semaphore | None = None
    _saving: asyncio.Task[None] | None = None
    _analyzed_at: float = -_ANALYZE_EVERY_SECONDS

    def __post_init__(self) -> None:
        route = self.runtime.route
        self._slots = asyncio.Semaphore(route.concurrency)
        if route.rate_limit_per_s:
            self._limiter = AsyncLimiter(route.rate_limit_per_s, 1.0)

    @property
    def name(self) -> str:
        return self.runtime.route.name

    @property
    def capacity(self) -> int:
        """Rows claimed at most: enough to keep every slot busy and to make each claim worth
        its query (at least 128), few enough that none waits in memory anywhere near its
        lease, even when every request takes the full timeout."""
        route = self.runtime.route
        lease = self.settings.lease_seconds
        room = max(2 * route.concurrency, 128)
        room = min(room, int(route.concurrency * lease / (4 * route.timeout_s)))
        if route.rate_limit_per_s:
            room = min(room, int(route.rate_limit_per_s * lease / 4))
        return max(1, room)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``. Nothing ends a lane silently: an unexpected error is logged
        with its cause and counted, and the lane starts again after a backoff."""
        failures = 0
        while True:
            try:
                await self._run_once(stop)
                return
            except Exception:  # whatever it is, the route must go on
                failures += 1
                log.exception("route %s: the lane failed; restarting it", self.name)
                self.metrics.lane_failures.labels(self.name, "lane").inc()
                await wait_any(stop, None, RECORD_BACKOFF.delay(failures))
                if stop.is_set():
                    return

    async def _run_once(self, stop: asyncio.Event) -> None:
        ended = asyncio.Event()  # the claim loop returned (stop) or failed
        recorder = asyncio.create_task(self._record_loop(ended))
        try:
            await self._claim_loop(stop)
        finally:
            ended.set()
            await self._finish(recorder)

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            pause = self.runtime.pause_left()
            if pause > 0 and self.runtime.disabled is None:
                await wait_any(stop, None, pause)
                continue
            room = self.capacity - self.in_flight
            if room < max(1, self.capacity // 2) and self.in_flight:
                self._progress.clear()
                await wait_any(stop, self._progress, self.settings.poll_interval)
                continue
            self.wake.clear()
            try:
                started = time.monotonic()
                claimed = await self.store.claim_retry_pass(
                    room, self.settings.lease_seconds, [self.name], claimer="lane"
                )
                await self._analyze_if_slow(time.monotonic() - started)
                failures = 0
            except DB_ERRORS as exc:
                failures += 1
                log.warning("route %s: database unavailable (%s)", self.name, one_line(exc))
                await wait_any(stop, None, RECORD_BACKOFF.delay(failures))
                continue
            if claimed:
                self._start([m for m, _ in claimed])
            else:
                await wait_any(stop, self.wake, await self._idle_timeout())

    async def _analyze_if_slow(self, seconds: float) -> None:
        """A slow claim means stale statistics (a backlog queued faster than autovacuum
        analyzes): refresh them, at most once a minute."""
        now = time.monotonic()
        if seconds < _SLOW_CLAIM_SECONDS or now - self._analyzed_at < _ANALYZE_EVERY_SECONDS:
            return
        self._analyzed_at = now
        log.info(
            "route %s: a claim took %.0f ms; analyzing route_pending", self.name, seconds * 1e3
        )
        await self.store.analyze_pending()

    async def _idle_timeout(self) -> float:
        try:
            due = await self.store.seconds_until_due([self.name])
        except DB_ERRORS:
            return self.settings.poll_interval
        if due is None:
            return self.settings.poll_interval
        return min(self.settings.poll_interval, max(due, 0.01))

    def _start(self, messages: Sequence[Outbound]) -> None:
        self.in_flight += len(messages)
        disabled = self.runtime.disabled
        if disabled is not None:
            for message in messages:
                self._finished(message, _disabled(message, disabled))
            return
        for chain in _chains(messages):
            task = asyncio.create_task(self._run_chain(chain))
            self._chains.add(task)
            task.add_done_callback(self._chains.discard)

    async def _run_chain(self, chain: list[Outbound]) -> None:
        """Messages of one key in order; after a failure the rest wait behind it."""
        blocked: Failed | None = None
        for message in chain:
            if blocked is None and self.runtime.disabled is not None:
                self._finished(message, _disabled(message, self.runtime.disabled))
                continue
            result = blocked or await self._attempt_safely(message)
            if isinstance(result, Failed) and result.kind not in ("permanent",):
                blocked = blocked or Failed(
                    "unavailable" if result.kind == "unavailable" else "held",
                    "held",
                    "an earlier message of this key is waiting for its retry",
                )
            self._finished(message, self.judge(message, result))
            if isinstance(result, Failed) and result.kind == "gone":
                self._disable(result)

    async def _attempt_safely(self, message: Outbound) -> Result:
        """An attempt that cannot end the chain: an unexpected error is a failed attempt
        (retried with backoff like any other, so the message is never dropped), logged with
        its cause and counted."""
        try:
            return await self._attempt(message)
        except Exception as exc:  # a bug must cost one attempt, not the key
            log.exception(
                "route %s: attempt of message %s failed unexpectedly", self.name, message.id
            )
            self.metrics.lane_failures.labels(self.name, "attempt").inc()
            return Failed("retry", "internal error", one_line(exc))

    async def _attempt(self, message: Outbound) -> Result:
        assert self._slots is not None
        async with self._slots:
            pause = self.runtime.pause_left()
            if pause > 0:  # the endpoint failed meanwhile: wait, spending no attempt
                return Failed("unavailable", PAUSED, "endpoint unavailable", pause)
            if self._limiter is not None:
                await self._limiter.acquire()
            result = await self.sink.deliver(message)
        self.runtime.observe_endpoint(result)
        return result

    def _disable(self, result: Failed) -> None:
        """HTTP 410: stop sending at once, and save the disable for every relay to see."""
        reason = f"endpoint answered {result.reason} Gone: disabled until an operator enables it"
        if self.runtime.disabled is None:
            log.error("route %s: %s", self.name, reason)
        self.runtime.disable(reason)
        if self._saving is None or self._saving.done():
            self._saving = asyncio.create_task(self._save_disable())

    async def _save_disable(self) -> None:
        """Write the disable to route_state, retrying while the database is unavailable;
        until it is saved, refreshes of the route state never turn the route back on."""
        failures = 0
        while (reason := self.runtime.unsaved_disable) is not None:
            try:
                await self.store.disable_route(self.name, reason)
            except DB_ERRORS as exc:
                failures += 1
                log.warning("route %s: could not save the disable (%s)", self.name, one_line(exc))
                await asyncio.sleep(RECORD_BACKOFF.delay(failures))
            else:
                self.runtime.disable_saved()

    def _finished(self, message: Outbound, verdict: Verdict) -> None:
        self._done.append((message, verdict))

    async def _record_loop(self, ended: asyncio.Event) -> None:
        while not (ended.is_set() and not self._chains and not self._done):
            await asyncio.sleep(_FLUSH_SECONDS)
            if self._done:
                await self._flush()

    async def _flush(self) -> None:
        done, self._done = self._done[:_FLUSH_ROWS], self._done[_FLUSH_ROWS:]
        plan = plan_retry_pass([(m, self.name) for m, _ in done], [v for _, v in done])
        started = time.monotonic()
        try:
            await self.store.record_patiently(plan, self.settings.lease_seconds * 0.8)
            self.metrics.record_took("lane", time.monotonic() - started)
        except DB_ERRORS as exc:
            # The leases stay: these rows come back after the lease, delivered twice at worst.
            log.error("route %s: could not record %d outcomes (%s)", self.name, len(done), exc)
        else:
            self.on_recorded(plan)
            log_dead_letters(plan, {m.seq: m for m, _ in done})
        finally:
            self.in_flight -= len(done)
            self._progress.set()

    async def _finish(self, recorder: asyncio.Task[None]) -> None:
        """Let requests in flight finish (up to the shutdown grace), then record them all."""
        if self._chains:
            _, pending = await asyncio.wait(self._chains, timeout=self.settings.shutdown_grace)
            if pending:
                self.sink.abort()
                await asyncio.wait(pending, timeout=5.0)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(recorder, timeout=self.settings.lease_seconds)
        if self._saving is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._saving, timeout=self.settings.shutdown_grace)
        while self._done:
            await self._flush()


def _chains(messages: Sequence[Outbound]) -> list[list[Outbound]]:
    """Group claimed rows: one chain per (topic, key) in seq order; keyless alone."""
    chains: dict[object, list[Outbound]] = {}
    for index, message in enumerate(sorted(messages, key=lambda m: m.seq)):
        group = (message.topic, message.key) if message.key is not None else index
        chains.setdefault(group, []).append(message)
    return list(chains.values())


def _disabled(message: Outbound, reason: str) -> Dead:
    return Dead(message.attempts, DISABLED, reason, "disabled")
