"""The relay draining a backlog to webhook routes: one fast route, and a fast route next to
a slow one (two topics, or one topic fanned out to both).

The relay runs in-process (``relay.app.run_relay`` with a stop event), configured through a
TOML file with ``[[routes]]`` as deployed. Each lane's ``on_recorded`` callback is wrapped to
count deliveries per route as they are committed: the clock runs from the ``run_relay`` call
until the timed route's last delivery row is committed (the moment the delivery table holds
them all), then the relay is stopped. Afterwards SQL (delivery rows and distinct messages per
route, what is left) and the endpoint's ``/stats`` (requests, distinct ``webhook-id``s,
signatures verified) must agree.
"""

from __future__ import annotations

import asyncio
import cProfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import outbox_lib
from relay.app import run_relay
from relay.config import Settings, load_settings
from relay.engine import Engine
from relay.plan import RecordPlan

from . import workload as w
from .results import Throughput
from .webhook_senders import Endpoint, Meter, per_1000, server_checks

FAST, SLOW = "fast", "slow"
FAST_TOPIC, SLOW_TOPIC = "wh.fast", "wh.slow"
POLL_INTERVAL_S = 1.0  # the relay's default: lanes are woken by the first pass anyway


@dataclass(frozen=True)
class LaneRoute:
    name: str
    topics: tuple[str, ...]
    endpoint: Endpoint
    concurrency: int


def config_toml(routes: Sequence[LaneRoute]) -> str:
    """``[[routes]]`` tables, as an operator would write them."""
    tables = []
    for r in routes:
        topics = ", ".join(f'"{t}"' for t in r.topics)
        tables.append(
            f'[[routes]]\nname = "{r.name}"\ntopics = [{topics}]\nsink = "webhook"\n'
            f'url = "{r.endpoint.url}"\nsecret = "{r.endpoint.secret}"\n'
            f"allow_private_network = true\nconcurrency = {r.concurrency}\n"
        )
    return "\n".join(tables)


def relay_settings(url: str, schema: str, routes: Sequence[LaneRoute], tmp: Path) -> Settings:
    path = tmp / "relay.toml"
    path.write_text(config_toml(routes), encoding="utf-8")
    flags = {"database_url": url, "schema": schema, "poll_interval": POLL_INTERVAL_S}
    return load_settings(flags, env={}, config_path=str(path))


@dataclass
class RouteClock:
    """Deliveries committed per route; the moment (and CPU) when ``route`` has ``expected``."""

    route: str
    expected: int
    meter: Meter
    counts: Counter[str] = field(default_factory=Counter)
    finished_at: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    at_finish: dict[str, int] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def attach(self, engine: Engine) -> None:
        for lane in engine.lanes:
            lane.on_recorded = self._counting(lane.name, lane.on_recorded)

    def _counting(self, name: str, original: Callable[[RecordPlan], None]) -> Callable[..., None]:
        def on_recorded(plan: RecordPlan) -> None:
            original(plan)
            self.counts[name] += plan.delivered_count
            if (
                name == self.route
                and self.finished_at is None
                and self.counts[name] >= self.expected
            ):
                self.finished_at = time.perf_counter()
                self.cpu = self.meter.stop()
                self.at_finish = dict(self.counts)
                self.done.set()

        return on_recorded


@dataclass
class Drain:
    seconds: float | None  # None: the timed route never had all its deliveries
    clock: RouteClock
    total_delivered: int


async def drain(
    settings: Settings, clock: RouteClock, timeout: float, profiler: cProfile.Profile | None = None
) -> Drain:
    """Run the relay until ``clock.route`` has all its deliveries (or ``timeout``), then stop."""
    stop = asyncio.Event()
    clock.meter.start()
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    relay = asyncio.create_task(run_relay(settings, stop, clock.attach))
    finished = asyncio.create_task(clock.done.wait())
    try:
        await asyncio.wait({relay, finished}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if profiler is not None:
            profiler.disable()
        stop.set()
        finished.cancel()
        stats = await relay  # raises what made the relay stop early
    seconds = clock.finished_at - started if clock.finished_at is not None else None
    return Drain(seconds, clock, stats.delivered)


def route_checks(url: str, schema: str) -> dict[str, Any]:
    """Delivery rows and distinct messages per route; messages, pending and dead rows left."""
    with w.connect(url) as conn:
        rows = conn.execute(w.query("deliveries_by_route", schema=schema)).fetchall()
        left = conn.execute(w.query("leftovers", schema=schema)).fetchone()
    assert left is not None
    return {
        "delivery_rows": {str(r): int(n) for r, n, _ in rows},
        "distinct_delivered": {str(r): int(d) for r, _, d in rows},
        "message_rows_left": int(left[0]),
        "route_pending_left": int(left[1]),
        "dead_letters": int(left[2]),
    }


# --- one fast route -------------------------------------------------------------------------


def fast_drain(
    url: str, source: str, endpoint: Endpoint, concurrency: int, meter: Meter, timeout: float
) -> Throughput:
    """The whole backlog to one webhook route."""
    schema = f"bench_wh_drain_{concurrency}"
    w.load_outbox(url, schema, FAST_TOPIC, source)
    expected = w.count_rows(url, schema, "message")
    w.checkpoint(url)
    wal_before = w.wal_lsn(url)
    endpoint.server.reset()
    route = LaneRoute(FAST, (FAST_TOPIC,), endpoint, concurrency)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-wh-") as tmp:
            settings = relay_settings(url, schema, [route], Path(tmp))
            run = asyncio.run(drain(settings, RouteClock(FAST, expected, meter), timeout))
        wal = w.wal_bytes_since(url, wal_before)
        checks = route_checks(url, schema)
    finally:
        w.drop_schema(url, schema)
    server = server_checks(endpoint.server.stats(), expected)
    rows = checks["delivery_rows"].get(FAST, 0)
    ok = (
        run.seconds is not None
        and rows == expected == checks["distinct_delivered"][FAST]
        and checks["message_rows_left"] == 0
        and server["endpoint_ok"]
    )
    return Throughput(
        f"outbox-relay drain, concurrency {concurrency}",
        rows,
        run.seconds or timeout,
        status="ok" if ok else "failed",
        note=_drain_note(checks, server, wal, rows),
        details={
            "kind": "relay",
            "concurrency": concurrency,
            "server": server,
            **checks,
            "cpu_seconds": run.clock.cpu,
            "cpu_s_per_1000": per_1000(run.clock.cpu, rows),
            "wal_bytes_per_message": wal / max(1, rows),
        },
    )


def _drain_note(checks: dict[str, Any], server: dict[str, Any], wal: int, rows: int) -> str:
    return (
        f"SQL: {rows:,} delivery rows ({checks['distinct_delivered'].get(FAST, 0):,} "
        f"distinct), {checks['message_rows_left']} messages left; endpoint saw "
        f"{server['requests']:,} requests, {server['ids']:,} ids, {server['verified']} "
        f"signatures verified, {server['verify_failures']} bad; "
        f"{wal / max(1, rows):,.0f} B WAL/msg"
    )


# --- a fast route next to a slow one --------------------------------------------------------

ALONE, TWO_TOPICS, FAN_OUT = (
    "fast route alone",
    "with slow route (2 topics)",
    "with slow route (1 topic fanned out)",
)
VARIANTS = (ALONE, TWO_TOPICS, FAN_OUT)


def isolation(
    url: str,
    source: str,
    fast: Endpoint,
    slow: Endpoint,
    concurrency: int,
    variant: str,
    meter: Meter,
    timeout: float,
) -> Throughput:
    """The odd half of the backlog on the fast topic; the even half on the slow topic
    (``TWO_TOPICS``), or the fast topic's messages also routed to the slow endpoint."""
    schema = "bench_wh_isolation"
    routes = [LaneRoute(FAST, (FAST_TOPIC,), fast, concurrency)]
    if variant != ALONE:
        topic = SLOW_TOPIC if variant == TWO_TOPICS else FAST_TOPIC
        routes.append(LaneRoute(SLOW, (topic,), slow, concurrency))
    _load_alternating(url, schema, source, SLOW_TOPIC if variant == TWO_TOPICS else None)
    expected = w.count_rows(url, schema, "message") // (2 if variant == TWO_TOPICS else 1)
    fast.server.reset()
    slow.server.reset()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-wh-") as tmp:
            settings = relay_settings(url, schema, routes, Path(tmp))
            run = asyncio.run(drain(settings, RouteClock(FAST, expected, meter), timeout))
        checks = route_checks(url, schema)
    finally:
        w.drop_schema(url, schema)
    return _isolation_result(
        variant, concurrency, expected, run, checks, server_checks(fast.server.stats(), expected)
    )


def _load_alternating(url: str, schema: str, source: str, even_topic: str | None) -> None:
    w.fresh_schema(url, schema)
    with w.connect(url) as conn:
        outbox_lib.migrate(conn, schema)
        conn.execute(
            w.query("load_outbox_alternating", schema=schema, source=source),
            {"odd": FAST_TOPIC, "even": even_topic},
        )
    w.checkpoint(url)


def _isolation_result(
    variant: str,
    concurrency: int,
    expected: int,
    run: Drain,
    checks: dict[str, Any],
    server: dict[str, Any],
) -> Throughput:
    rows = checks["delivery_rows"].get(FAST, 0)
    slow_then = run.clock.at_finish.get(SLOW, 0)
    ok = (
        run.seconds is not None
        and rows == expected == checks["distinct_delivered"][FAST]
        and server["endpoint_ok"]
    )
    note = (
        f"fast: {rows:,} delivery rows ({checks['distinct_delivered'].get(FAST, 0):,} "
        f"distinct), endpoint saw {server['requests']:,} requests, {server['ids']:,} ids"
    )
    if variant != ALONE:
        note += f"; slow route delivered {slow_then:,} meanwhile"
    return Throughput(
        f"isolation: {variant}, concurrency {concurrency}",
        rows,
        run.seconds or 0.0,
        status="ok" if ok else "failed",
        note=note,
        details={
            "kind": "isolation",
            "variant": variant,
            "concurrency": concurrency,
            "server": server,
            **checks,
            "slow_delivered_meanwhile": slow_then,
            "cpu_seconds": run.clock.cpu,
            "cpu_s_per_1000": per_1000(run.clock.cpu, rows),
        },
    )


# --- a profile of the fast drain ------------------------------------------------------------


def profile_drain(
    url: str, source: str, endpoint: Endpoint, concurrency: int, meter: Meter, seconds: float
) -> tuple[cProfile.Profile, int]:
    """The fast drain under cProfile for ``seconds`` (then stopped): (profile, delivered)."""
    schema = "bench_wh_profile"
    w.load_outbox(url, schema, FAST_TOPIC, source)
    expected = w.count_rows(url, schema, "message")
    w.checkpoint(url)
    endpoint.server.reset()
    profiler = cProfile.Profile()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-wh-") as tmp:
            route = LaneRoute(FAST, (FAST_TOPIC,), endpoint, concurrency)
            settings = relay_settings(url, schema, [route], Path(tmp))
            run = asyncio.run(drain(settings, RouteClock(FAST, expected, meter), seconds, profiler))
    finally:
        w.drop_schema(url, schema)
    return profiler, run.clock.counts[FAST]
