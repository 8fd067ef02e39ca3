"""The relay loop: wake, read a batch, send it to every matching route, record, repeat.

Two passes share the loop. The *first pass* reads the outbox as a log (``relay.ticks``):
the messages committed between two recorded snapshots, in ``seq`` order, sent to all their
routes at once; recording them moves one cursor past them, nothing marks a message read. It
is the hot path, and its cost is the batch, whatever the table's state; while a chunk is
sent, the next one is read and the one before is recorded (:meth:`Engine._first_pass`). The
*retry pass*
claims ``route_pending`` rows that are due again. Per-key order on a route holds because a
message queues ("parks") behind any earlier pending work of its key on that route, and
claims never pass an earlier message of the same key that is leased or not due.

With several relays, the first pass is read by the relay holding bucket 0 (the cursor moves
only for it), and the retry pass claims keyed work only of the key buckets this relay holds
(see :mod:`relay.membership`); keyless retries go to any relay. A bucket another relay is
waiting for is handed over between two steps, when nothing of this relay is in flight.
"""

from __future__ import annotations

import asyncio
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
from .store import DB_ERRORS, FirstPassChunk, FirstPassLost, FirstPassStale, Store, listen

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
    _matches: dict[str, list[RouteRuntime]] = field(default_factory=dict)
    _stop: asyncio.Event | None = None
    _routes_checked: float = 0.0
    metrics: Metrics = field(init=False)
    metrics_port: int | None = None  # the port bound (the setting may say 0: any free port)
    # Set when the schema was migrated for newer relays while this one ran: it stops.
    incompatible: SchemaTooNewError | None = None
    # The first-pass record still running while the next chunk is read and sent (_settle).
    _recording: asyncio.Future[None] | None = None
    # The chunk after the one being sent, read (beside the route_pending probe) meanwhile.
    _ahead: asyncio.Future[tuple[FirstPassChunk, bool]] | None = None
    # A chunk recorded while the one read ahead of it was in flight queued route_pending
    # work: that one's messages must be checked against it, whatever its probe said.
    _queued_meanwhile: bool = False
    _wake: asyncio.Event | None = None

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

    def _routes_for(self, topic: str) -> list[RouteRuntime]:
        matched = self._matches.get(topic)
        if matched is None:
            matched = self._matches[topic] = [r for r in self.routes if r.route.matches(topic)]
        return matched

    async def run(self, stop: asyncio.Event, conninfo: str) -> None:
        """Drain until ``stop`` is set, then hand back anything still held."""
        self._stop = stop
        wake = self._wake = asyncio.Event()
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
                    await self._stop_reading(quietly=True)
                    await wait_any(stop, None, OUTAGE_BACKOFF.delay(failures))
                    continue
                # A NOTIFY during the step, or a chunk read ahead, means more to read now: no
                # wait, and no need to ask the database how long one would be.
                if handled < self.settings.batch_size and not wake.is_set() and self._ahead is None:
                    await self._settle()
                    if not wake.is_set():
                        await wait_any(stop, wake, await self._idle_timeout())
        finally:
            stop.set()
            await self._stop_reading(quietly=True)
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

        Nothing of this relay is in flight here: the previous batch is recorded. So the
        successor can never send a key while this relay still has it on the wire.
        """
        if not self.membership.handoff_due:
            return
        await self._stop_reading()
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
        active = [
            r for r in inline if (r.pause_left() == 0 and not r.busy) or r.disabled is not None
        ]
        first: list[Outbound] = []
        # Every route paused: read nothing, rather than queue the backlog as retries.
        all_paused = bool(inline) and not active and len(inline) == len(self.routes)
        if await self._reads_first_pass() and not all_paused:
            chunk, pending = await self._next_chunk()
            first = chunk.messages
            if chunk.moves:
                await self._first_pass(chunk, pending)
            if first:
                for lane in self.lanes:
                    lane.wake.set()
        else:
            if self._ahead is not None:  # nothing is sent now: read it again later
                await self._stop_reading()
            pending = await self.store.any_route_pending()
        retry: list[tuple[Outbound, str]] = []
        if pending:
            await self._settle()  # the retry pass never runs beside a first-pass record
            names = [r.route.name for r in active]
            retry = await self.store.claim_retry_pass(
                self.settings.batch_size, self.settings.lease_seconds, names
            )
        if retry:
            await self._retry_pass(retry)
        self.stats.batches += 1
        self.stats.claimed += len(first) + len(retry)
        return max(len(first), len(retry))

    async def _reads_first_pass(self) -> bool:
        """The first pass is this relay's to read while it holds bucket 0."""
        if 0 in self.membership.buckets:
            return True
        await self._stop_reading()
        return False

    async def _stop_reading(self, *, quietly: bool = False) -> None:
        """Nothing of the first pass in flight: the chunk read ahead is dropped, the record
        is waited for (``quietly``, after a failure or on the way out: whatever it raises is
        logged), and the next read starts from the cursor in the database."""
        await self._drop_ahead()
        await (self._settle_quietly() if quietly else self._settle())
        self.store.forget_first_pass()

    async def _read_chunk(self) -> tuple[FirstPassChunk, bool]:
        """The next chunk, and whether anything is queued in route_pending, asked beside the
        read (two connections): the probe comes first in neither order, and what the
        chunk's messages must queue behind was committed before both began."""
        probe = asyncio.ensure_future(self.store.any_route_pending())
        try:
            chunk = await self.store.read_first_pass(self.settings.batch_size)
        finally:
            pending = await probe
        return chunk, pending

    async def _next_chunk(self) -> tuple[FirstPassChunk, bool]:
        """The chunk read ahead, unless a failed record made it stale; else a new read."""
        ahead, self._ahead = self._ahead, None
        queued, self._queued_meanwhile = self._queued_meanwhile, False
        if ahead is not None:
            chunk, pending = await ahead
            if self.store.current(chunk):
                return chunk, pending or queued
        return await self._read_chunk()

    def _reads_ahead(self, chunk: FirstPassChunk) -> bool:
        """Read the next chunk while this one is sent? When this one filled the batch size
        (a backlog), or a NOTIFY came since the step began (more committed meanwhile)."""
        if len(chunk.messages) >= self.settings.batch_size:
            return True
        return self._wake is not None and self._wake.is_set()

    async def _drop_ahead(self) -> None:
        """Wait for the read ahead, if any, and drop it. The store's reading has moved past
        it: the caller makes the next read start from the cursor again."""
        ahead, self._ahead = self._ahead, None
        self._queued_meanwhile = False
        if ahead is None:
            return
        try:
            await ahead
        except Exception as exc:  # noqa: BLE001 - nothing of it was sent
            log.debug("first pass: the read ahead failed (%s)", one_line(exc))

    async def _first_pass(self, chunk: FirstPassChunk, pending: bool) -> None:
        """Send a chunk to its routes, then record the outcome and move the cursor past it.

        A pipeline of three: while this chunk is sent, the next one is read (when this one
        filled the batch size, or a NOTIFY came), and the record of the one before runs on;
        this chunk's record runs on while the next step sends the next chunk. Sends stay one
        at a time and in order. A chunk is recorded only after the one before it commits (its
        position follows on from the one that record writes); should a record fail, the
        chunks read after it are never recorded: they are read again from the cursor and
        sent again (at-least-once, in order: the broker sees a prefix once more), and one
        read but not yet sent is dropped. A chunk whose record queues work in
        ``route_pending`` (a failure, a paused route, a lane) is waited for, and the chunk
        read meanwhile is checked against that work whatever its probe said: its messages
        of those keys must queue behind it.
        """
        try:
            sending, routes_of, verdicts = await self._start_first_pass(chunk.messages, pending)
            if self._reads_ahead(chunk):
                self._ahead = asyncio.ensure_future(self._read_chunk())
            self._judge_all(await sending, verdicts)
            plan = plan_first_pass(chunk.messages, verdicts, routes_of)
            await self._settle()  # the chunk before this one is recorded first
        except BaseException:
            # Nothing of the chunk is recorded: read it again from the cursor, never past it.
            self.store.forget_first_pass()
            raise
        self._recording = asyncio.ensure_future(self._record_first_pass(chunk, plan))
        if plan.fanned:
            await self._settle()
            self._queued_meanwhile = self._ahead is not None

    async def _record_first_pass(self, chunk: FirstPassChunk, plan: RecordPlan) -> None:
        started = time.monotonic()
        try:
            # Ride out a short database outage rather than send the chunk again.
            await self.store.record_first_pass(chunk, plan, self.settings.lease_seconds * 0.8)
        except FirstPassStale:
            log.debug("first pass: %d messages read ahead of a failed record; reading again",
                      len(chunk.messages))  # fmt: skip
            return
        except FirstPassLost as exc:
            # Sent, not recorded: whoever moved the cursor sends these again (at-least-once).
            log.warning("first pass: %s; %d messages not recorded", exc, len(chunk.messages))
            return
        self.metrics.record_took("first", time.monotonic() - started)
        self._count(plan)
        log_dead_letters(plan, {m.seq: m for m in chunk.messages})

    async def _settle(self) -> None:
        """Wait for the first-pass record in flight, if any; raises what made it fail."""
        recording, self._recording = self._recording, None
        if recording is not None:
            await recording

    async def _settle_quietly(self) -> None:
        try:
            await self._settle()
        except Exception as exc:  # noqa: BLE001 - its chunk is read and sent again
            log.warning("first pass: a record failed (%s); reading again", one_line(exc))

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
        # What each route does with this chunk is decided once per topic, not per message.
        per_topic: dict[str, tuple[list[str], list[tuple[RouteRuntime, str, str]]]] = {}
        for message in messages:
            seq, topic, key = message.seq, message.topic, message.key
            decided = per_topic.get(topic)
            if decided is None:
                decided = per_topic[topic] = self._decide_routes(topic)
            names, routes = decided
            routes_of[seq] = names
            for runtime, name, mode in routes:
                if mode == _DISABLED:
                    verdicts[(seq, name)] = _disabled(runtime)
                elif mode == _LANE:
                    verdicts[(seq, name)] = parked()  # queued for the route's lane
                elif blocked and key is not None and (name, topic, key) in blocked:
                    verdicts[(seq, name)] = parked()
                elif mode == _HOLD:
                    verdicts[(seq, name)] = self._judge(runtime, message, _PAUSED)
                else:
                    to_send.setdefault(name, []).append(message)
        return asyncio.ensure_future(self._send_all(to_send)), routes_of, verdicts

    def _decide_routes(self, topic: str) -> tuple[list[str], list[tuple[RouteRuntime, str, str]]]:
        """The routes of ``topic`` for one chunk: (runtime, name, what it does with it)."""
        routes = [(r, r.route.name, self._mode(r)) for r in self._routes_for(topic)]
        return [name for _, name, _ in routes], routes

    @staticmethod
    def _mode(runtime: RouteRuntime) -> str:
        if runtime.disabled is not None:
            return _DISABLED
        if runtime.is_lane:
            return _LANE
        if runtime.pause_left() > 0 or runtime.busy:
            return _HOLD
        return _SEND

    def _judge_all(self, sent: SendResults, verdicts: dict[Item, Verdict]) -> None:
        for name, batch_results in sent:
            runtime = self._runtime(name)
            for message, result in batch_results:
                verdicts[(message.seq, name)] = self._judge(runtime, message, result)

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
        """Send each route's share at once. With more than one route, a route that has not
        answered within ``hold_seconds`` is left to finish in the background: its share is
        queued for its retries (no attempt spent) and the route pauses, so a dead broker or
        endpoint never holds back the other routes. It is sent nothing more until that send
        ends. With one route there is nobody to hold back, and the pass waits."""
        names = list(to_send)
        if not names:
            return []
        tasks = [asyncio.ensure_future(self._send(self._runtime(n), to_send[n])) for n in names]
        timeout = self.settings.hold_seconds if len(self.routes) > 1 else None
        done, _ = await asyncio.wait(tasks, timeout=timeout)
        sent: SendResults = []
        for name, task in zip(names, tasks, strict=True):
            if task in done:
                sent.append((name, task.result()))
                continue
            runtime = self._runtime(name)
            runtime.unanswered = task
            task.add_done_callback(_forget)
            silent = Failed("unavailable", NO_ANSWER, f"no answer within {timeout:g} s")
            log.warning("route %s: no answer within %g s; its messages wait for its retries",
                        name, timeout)  # fmt: skip
            runtime.observe([silent])
            sent.append((name, [(m, silent) for m in to_send[name]]))
        return sent

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
        try:
            released = await self.store.release_all()
            if released:
                log.info("released %d claimed retries on shutdown", released)
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
NO_ANSWER = "no answer"

# What a route does with a first-pass chunk (Engine._mode): dead-letter it (disabled), leave
# it to the route's lane, hold it (paused, or a send still unanswered), or send it now.
_DISABLED, _LANE, _HOLD, _SEND = "disabled", "lane", "hold", "send"


def _forget(task: asyncio.Future[list[tuple[Outbound, Result]]]) -> None:
    """A send given up on: its outcome is not recorded (its messages were queued for the
    route's retries, so what it delivered late is delivered again: at-least-once)."""
    if not task.cancelled():
        task.exception()  # _send logs and absorbs sink errors; nothing else can be here


def _disabled(runtime: RouteRuntime, attempts: int = 0) -> Dead:
    return Dead(attempts, DISABLED, runtime.disabled, "disabled")
