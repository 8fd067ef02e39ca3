"""The claim loop: wake, claim a batch, send it to every matching route, record, repeat.

Two passes share the loop. The *first pass* claims messages that were never attempted and
sends each to all its routes at once; this is the hot path and touches only ``message``.
The *retry pass* claims ``route_pending`` rows that are due again. Per-key order on a route
holds because a message queues ("parks") behind any earlier pending work of its key on that
route, and claims never pass an earlier message of the same key that is leased or not due.

With several relays, both passes claim keyed work only of the key buckets this relay holds
(see :mod:`relay.membership`); keyless work goes to any relay. A bucket another relay is
waiting for is handed over between two steps, when nothing of this relay is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Settings
from .errors import SchemaTooNewError, one_line
from .lanes import Lane, LaneSettings
from .membership import Membership
from .metrics import Metrics
from .plan import (
    DISABLED,
    PAUSED,
    Dead,
    RecordPlan,
    Verdict,
    parked,
    plan_first_pass,
    plan_retry_pass,
    verdict,
)
from .runtime import MAX_RETRY_AFTER, OUTAGE_BACKOFF, RouteRuntime, log_dead_letters, wait_any
from .sinks.base import Failed, Outbound, Result
from .sinks.webhook import WebhookSink
from .store import DB_ERRORS, HeldBatch, Store, listen

log = logging.getLogger(__name__)

Item = tuple[int, str]  # (message seq, route name)
SendResults = list[tuple[str, list[tuple[Outbound, Result]]]]


@dataclass
class Stats:
    """Running totals, for logs and the demo's progress bar."""

    delivered: int = 0
    dead: int = 0
    batches: int = 0
    claimed: int = 0


@dataclass
class Engine:
    settings: Settings
    store: Store
    routes: list[RouteRuntime]
    membership: Membership
    stats: Stats = field(default_factory=Stats)
    lanes: list[Lane] = field(default_factory=list)
    _prefetch: asyncio.Future[HeldBatch] | None = None
    _matches: dict[str, list[RouteRuntime]] = field(default_factory=dict)
    _stop: asyncio.Event | None = None
    _routes_checked: float = 0.0
    metrics: Metrics = field(init=False)
    metrics_port: int | None = None  # the port bound (the setting may say 0: any free port)
    # Set when the schema was migrated for newer relays while this one ran: it stops.
    incompatible: SchemaTooNewError | None = None

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.store.relay_id, self.store.schema)
        self.metrics.add_routes({r.route.name: r.route.sink for r in self.routes})
        self.store.on_claim = self.metrics.claimed
        lane_settings = LaneSettings(
            self.settings.lease_seconds, self.settings.poll_interval, self.settings.shutdown_grace
        )
        self.lanes = [
            Lane(
                r, r.sink, self.store, lane_settings, self._judge_for(r), self._count, self.metrics
            )
            for r in self.routes
            if r.is_lane and isinstance(r.sink, WebhookSink)
        ]

    @property
    def inline_routes(self) -> list[RouteRuntime]:
        """Routes sent in the claim loop itself (Kafka); lanes deliver the others."""
        return [r for r in self.routes if not r.is_lane]

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _routes_for(self, topic: str) -> list[RouteRuntime]:
        matched = self._matches.get(topic)
        if matched is None:
            matched = self._matches[topic] = [r for r in self.routes if r.route.matches(topic)]
        return matched

    async def run(self, stop: asyncio.Event, conninfo: str) -> None:
        """Drain until ``stop`` is set, then hand back anything still held."""
        self._stop = stop
        wake = asyncio.Event()
        tasks = [
            asyncio.create_task(listen(conninfo, self.store.schema, wake, stop)),
            asyncio.create_task(self.membership.run(stop, wake)),
        ]
        lanes = [asyncio.create_task(lane.run(stop)) for lane in self.lanes]
        failures = 0
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    await self._refresh_routes()
                    await self._hand_over_if_due()
                    handled = await self.step()
                    failures = 0
                except DB_ERRORS as exc:
                    failures += 1
                    log.warning("database unavailable (%s); retrying", one_line(exc))
                    await wait_any(stop, None, OUTAGE_BACKOFF.delay(failures))
                    continue
                if handled < self.settings.batch_size:
                    await wait_any(stop, wake, await self._idle_timeout())
        finally:
            stop.set()
            # Lanes finish their requests in flight (up to the shutdown grace) and record.
            await asyncio.gather(*lanes, return_exceptions=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._shutdown()

    async def _refresh_routes(self) -> None:
        """Learn which routes are disabled (by HTTP 410 or an operator), every heartbeat."""
        now = time.monotonic()
        if now - self._routes_checked < self.settings.heartbeat_seconds:
            return
        self._routes_checked = now
        try:
            await self.store.check_format()
        except SchemaTooNewError as exc:
            log.error("stopping: %s", exc)
            self.incompatible = exc
            assert self._stop is not None
            self._stop.set()
            return
        started = time.monotonic()
        disabled = await self.store.disabled_routes()
        for runtime in self.routes:
            reason = disabled.get(runtime.route.name)
            if not runtime.learn(reason, started):
                continue
            if reason is None:
                log.info("route %s enabled again", runtime.route.name)
            else:
                log.warning("route %s is disabled: %s", runtime.route.name, reason)
        for lane in self.lanes:
            lane.wake.set()

    async def _hand_over_if_due(self) -> None:
        """Between batches, give away buckets another relay is waiting for.

        Nothing of this relay is in flight here: the previous batch is recorded, and a
        prefetched claim (it may hold messages of those buckets) is given back first. So
        the successor can never send a key while this relay still has it on the wire.
        """
        if not self.membership.handoff_due:
            return
        await self._settle_prefetch(keep=False)
        await self.membership.hand_over()

    async def _idle_timeout(self) -> float:
        timeout = self.settings.poll_interval
        inline = self.inline_routes
        paused = [r.pause_left() for r in inline if r.pause_left() > 0]
        if paused and len(paused) == len(self.routes):
            return min(paused)
        if not inline:
            return timeout
        try:
            due = await self.store.seconds_until_due([r.route.name for r in inline])
        except DB_ERRORS:
            return timeout
        return timeout if due is None else min(timeout, max(due, 0.01))

    async def step(self) -> int:
        """One batch of each pass; returns how many (message, route) items were handled."""
        inline = self.inline_routes
        active = [r for r in inline if r.pause_left() == 0 or r.disabled is not None]
        if inline and not active and len(inline) == len(self.routes):
            await self._settle_prefetch(keep=False)  # hold no locks across a pause
            return 0
        held = await self._take_prefetched() or await self.store.hold_first_pass(
            self.settings.batch_size
        )
        first = held.messages
        pending = await self.store.any_route_pending()
        if first:
            await self._first_pass(held, pending)
            for lane in self.lanes:
                lane.wake.set()
        retry: list[tuple[Outbound, str]] = []
        if pending:
            names = [r.route.name for r in active]
            retry = await self.store.claim_retry_pass(
                self.settings.batch_size, self.settings.lease_seconds, names
            )
        if retry:
            await self._retry_pass(retry)
        self.stats.batches += 1
        self.stats.claimed += len(first) + len(retry)
        return max(len(first), len(retry))

    async def _take_prefetched(self) -> HeldBatch | None:
        task, self._prefetch = self._prefetch, None
        return await task if task is not None else None

    async def _first_pass(self, held: HeldBatch, pending: bool) -> None:
        """Send a held batch; record in its transaction, or lease it if sending is slow."""
        try:
            sending, routes_of, verdicts = await self._start_first_pass(held.messages, pending)
            self._maybe_prefetch(len(held.messages))
            done, _ = await asyncio.wait({sending}, timeout=self.settings.hold_seconds)
            if not done:
                await self._settle_prefetch(keep=False)
                await held.lease(self.settings.lease_seconds)
            self._judge_all(await sending, verdicts)
            plan = plan_first_pass(held.messages, verdicts, routes_of)
            if done and (plan.fanned or plan.released):
                # Released rows go back before the prefetched batch in seq order: that
                # batch must be re-claimed, or it would overtake them on their keys.
                await self._settle_prefetch(keep=not plan.released)
        except BaseException:
            await held.abandon()
            raise
        if done:
            started = time.monotonic()
            await held.commit(plan)
            self.metrics.record_took("first", time.monotonic() - started)
            self._count(plan)
        else:
            await self._record(plan, "first")
        log_dead_letters(plan, {m.seq: m for m in held.messages})

    async def _settle_prefetch(self, keep: bool) -> None:
        """Let the next claim finish before this batch updates any of its rows.

        A claim that reaches a row just after another transaction updated it locks the new
        version, finds it no longer matches (EvalPlanQual) and skips it, but keeps the lock
        until it ends. Were the next claim still running when this batch leases, settles or
        releases its rows, it could keep some of them locked, and this batch's own record
        would wait for a transaction that ends only after that record: a deadlock that only
        the idle-in-transaction timeout breaks. Rows still locked by this batch are skipped
        cleanly, and deleted rows cannot be locked, so the common all-delivered batch needs
        no wait. A slow batch gives its prefetched successor back, so no transaction waits
        across a slow send.
        """
        task = self._prefetch
        if task is None:
            return
        await asyncio.wait({task})
        if not keep:
            held = await self._take_prefetched()
            if held is not None:
                await held.abandon()

    async def _start_first_pass(
        self, messages: list[Outbound], pending: bool
    ) -> tuple[asyncio.Future[SendResults], dict[int, list[str]], dict[Item, Verdict]]:
        """Route every message, park what must queue behind its key, start the sends."""
        # Only routes sent here need the check; lanes queue everything behind their keys anyway.
        check = pending and any(not r.is_lane for r in self.routes)
        blocked = await self.store.blocked_keys(messages) if check else set()
        routes_of: dict[int, list[str]] = {}
        verdicts: dict[Item, Verdict] = {}
        to_send: dict[str, list[Outbound]] = {}
        for message in messages:
            matched = self._routes_for(message.topic)
            routes_of[message.seq] = [r.route.name for r in matched]
            for runtime in matched:
                name = runtime.route.name
                if runtime.disabled is not None:
                    verdicts[(message.seq, name)] = _disabled(runtime)
                elif runtime.is_lane:
                    verdicts[(message.seq, name)] = parked()  # queued for the route's lane
                elif message.key is not None and (name, message.topic, message.key) in blocked:
                    verdicts[(message.seq, name)] = parked()
                elif runtime.pause_left() > 0:
                    verdicts[(message.seq, name)] = self._judge(runtime, message, _PAUSED)
                else:
                    to_send.setdefault(name, []).append(message)
        return asyncio.ensure_future(self._send_all(to_send)), routes_of, verdicts

    def _judge_all(self, sent: SendResults, verdicts: dict[Item, Verdict]) -> None:
        for name, batch_results in sent:
            runtime = self._runtime(name)
            for message, result in batch_results:
                verdicts[(message.seq, name)] = self._judge(runtime, message, result)

    def _maybe_prefetch(self, claimed: int) -> None:
        """While a full batch is being sent, claim the next one: a backlog drains faster.

        Safe for per-key order because the next batch is sent only after this one is
        recorded, so its blocked-key check sees whatever this batch left pending.
        """
        if claimed >= self.settings.batch_size and not self._stopping():
            self._prefetch = asyncio.ensure_future(
                self.store.hold_first_pass(self.settings.batch_size)
            )

    async def _retry_pass(self, claimed: list[tuple[Outbound, str]]) -> None:
        to_send: dict[str, list[Outbound]] = {}
        by_item: dict[Item, Verdict] = {}
        for message, name in claimed:
            runtime = self._runtime(name)
            if runtime.disabled is not None:
                by_item[(message.seq, name)] = _disabled(runtime, message.attempts)
            else:
                to_send.setdefault(name, []).append(message)
        self._judge_all(await self._send_all(to_send), by_item)
        verdicts = [by_item[(m.seq, n)] for m, n in claimed]
        plan = plan_retry_pass(claimed, verdicts)
        await self._record(plan, "retry")
        log_dead_letters(plan, {m.seq: m for m, _ in claimed})

    def _runtime(self, name: str) -> RouteRuntime:
        return next(r for r in self.routes if r.route.name == name)

    async def _send_all(self, to_send: dict[str, list[Outbound]]) -> SendResults:
        names = list(to_send)
        sent = await asyncio.gather(*(self._send(self._runtime(n), to_send[n]) for n in names))
        return list(zip(names, sent, strict=True))

    async def _send(
        self, runtime: RouteRuntime, batch: list[Outbound]
    ) -> list[tuple[Outbound, Result]]:
        try:
            results = await runtime.sink.send(runtime.route, batch)
        except Exception as exc:
            log.exception(
                "route %s: sink raised; treating the batch as unavailable", runtime.route.name
            )
            results = [Failed("unavailable", "sink error", one_line(exc))] * len(batch)
        runtime.observe(results)
        return list(zip(batch, results, strict=True))

    def _judge_for(self, runtime: RouteRuntime) -> Callable[[Outbound, Result], Verdict]:
        return lambda message, result: self._judge(runtime, message, result)

    def _judge(self, runtime: RouteRuntime, message: Outbound, result: Result) -> Verdict:
        if not isinstance(result, Failed):
            return result
        backoff = runtime.backoff.delay(message.attempts + 1)
        if result.retry_after is not None:  # never sooner than the endpoint asked
            backoff = max(backoff, min(result.retry_after, MAX_RETRY_AFTER))
        return verdict(
            result, message.attempts, runtime.route.max_attempts, backoff, runtime.pause_left()
        )

    async def _record(self, plan: RecordPlan, pass_: str) -> None:
        """Write the outcome; ride out a short database outage rather than redeliver."""
        started = time.monotonic()
        await self.store.record_patiently(plan, self.settings.lease_seconds * 0.8)
        self.metrics.record_took(pass_, time.monotonic() - started)
        self._count(plan)

    def _count(self, plan: RecordPlan) -> None:
        """Every recorded plan comes here (both passes and the lanes), once committed."""
        self.stats.delivered += plan.delivered_count
        self.stats.dead += plan.dead_count
        self.metrics.recorded(plan)

    async def _shutdown(self) -> None:
        if self._prefetch is not None:
            # Locked but never sent: rolling back frees the rows for the next relay.
            with contextlib.suppress(*DB_ERRORS):
                held = await self._take_prefetched()
                if held is not None:
                    await held.abandon()
        try:
            released = await self.store.release_all()
            if released:
                log.info("released %d claimed messages on shutdown", released)
        except DB_ERRORS as exc:
            log.warning(
                "could not release claims on shutdown (%s); their leases will expire",
                one_line(exc),
            )
        try:
            await self.membership.leave()
        except DB_ERRORS as exc:
            log.warning(
                "could not give back bucket leases on shutdown (%s); they will expire",
                one_line(exc),
            )
        for runtime in self.routes:
            await runtime.sink.close()


_PAUSED = Failed("unavailable", PAUSED, "sink unreachable; waiting before the next try")


def _disabled(runtime: RouteRuntime, attempts: int = 0) -> Dead:
    return Dead(attempts, DISABLED, runtime.disabled, "disabled")
