"""``outbox-relay demo``: the whole pipeline on an embedded PostgreSQL and broker.

A sample order-taking app (:mod:`relay.sample_app`) writes each order and its
``orders.created`` message in one transaction (every tenth one is rolled back on purpose).
The topic fans out to two routes: the Kafka topic of the same name, and the
``billing-hook`` webhook, a local receiver that verifies every signature and now and then
answers 503 to show retries (:mod:`relay.demo_webhook`). Several relays run in the same process:
they first share out the key buckets evenly (the first to join takes them all and hands the
others their share), then drain the outbox together while the app is still writing, each
delivering the keys of its own buckets. Once the outbox is empty, a consumer reads the
Kafka topic back to prove what arrived (:mod:`relay.demo_check`): every committed order, no
rolled-back one, the contract's headers, and per-customer order across relays; the
receiver's log is checked the same way. Exit code 0 only if every check passes on both
routes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import sqlalchemy
from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public path, stub gap
    AdminClient,
    NewTopic,
)
from psycopg import sql
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

import outbox_lib

from .app import run_relay
from .config import Settings, load_settings
from .db import connect
from .demo_check import Outcome, RelayShare, consume, print_summary, verify
from .demo_webhook import Receiver, check_webhooks, new_secret, route_toml
from .embedded import EmbeddedBroker, EmbeddedPostgres
from .engine import Engine, Stats
from .errors import RelayError
from .membership import Membership
from .ownership import BUCKETS
from .sample_app import TOPIC, Base, place_order, sqlalchemy_url
from .store import relay_queries

HOOK_ROUTE = "billing-hook"
ROUTES = 2  # the topic goes to Kafka and to the webhook
_SECRET_ENV = "DEMO_BILLING_HOOK_SECRET"  # noqa: S105 -- a variable name, not a secret
_KAFKA_ROUTE_TOML = f"""\
[[routes]]
name = "orders-to-kafka"
topics = ["{TOPIC}"]
sink = "kafka"
"""
# Several partitions, so the per-key order check means something (one partition would
# order everything trivially).
PARTITIONS = 4
ROLLBACK_EVERY = 10
DRAIN_TIMEOUT_S = 120.0
CONSUME_TIMEOUT_S = 30.0
SPREAD_TIMEOUT_S = 10.0
# Short leases and heartbeats, so joining relays get their share of the buckets quickly.
HEARTBEAT_S = 0.5
BUCKET_LEASE_S = 5.0
_REFRESH_S = 0.05
_MIN_SHM_FREE = 512 * 1024 * 1024


class _Abandon(Exception):
    """Raised inside an order's transaction to roll it back, as an app error would."""


@dataclass(frozen=True)
class _Relay:
    """One running relay as the demo watches it: its totals and its bucket leases.

    Not the engine: holding that would keep its Kafka producer, and so its broker
    connections, alive after the relay stops, and Tansu's SIGTERM waits for every client
    to hang up (5 s, then SIGKILL).
    """

    stats: Stats
    membership: Membership

    @property
    def buckets(self) -> frozenset[int]:
        return self.membership.buckets

    @property
    def draining(self) -> bool:
        return self.membership.handoff_due


@dataclass
class Tally:
    """Shared by the writer thread (appends) and the event loop (reads lengths)."""

    committed: list[int] = field(default_factory=list)
    rolled_back: list[int] = field(default_factory=list)
    relays: list[_Relay] = field(default_factory=list)

    @property
    def written(self) -> int:
        return len(self.committed) + len(self.rolled_back)

    @property
    def delivered(self) -> int:
        """Deliveries on either route."""
        return sum(relay.stats.delivered for relay in self.relays)

    @property
    def settled(self) -> int:
        """Deliveries and dead letters on either route: at ``ROUTES`` per committed order,
        the outbox should be empty."""
        return self.delivered + sum(relay.stats.dead for relay in self.relays)

    def attach(self, engine: Engine) -> None:
        """``on_start`` of every relay: numbered in the order they started."""
        self.relays.append(_Relay(engine.stats, engine.membership))

    def evenly_spread(self, relays: int) -> bool:
        """All ``relays`` started and hold every bucket, within one of each other, with
        no handoff pending."""
        counts = [len(relay.buckets) for relay in self.relays]
        return (
            len(counts) == relays
            and sum(counts) == BUCKETS
            and max(counts) - min(counts) <= 1
            and not any(relay.draining for relay in self.relays)
        )

    def shares(self) -> tuple[RelayShare, ...]:
        """Each relay's deliveries and the number of buckets it holds now."""
        return tuple(RelayShare(r.stats.delivered, len(r.buckets)) for r in self.relays)


@dataclass(frozen=True)
class _Drained:
    """Every committed order delivered: each relay's share, and how long it all took."""

    shares: tuple[RelayShare, ...]
    spread_s: float
    elapsed_s: float


@dataclass(frozen=True)
class _Watch:
    """What the demo watches while the relays drain, and where it shows it; ``conn`` and
    ``pending`` (``status``'s query) are the demo's own look at the outbox."""

    tally: Tally
    hook: Receiver
    console: Console
    conn: psycopg.Connection[Any]
    pending: sql.Composed

    async def drained(self) -> bool:
        """Every committed order settled on both routes: the outbox is empty.

        A message leaves the outbox only once every route has it (or dead-lettered it), and
        the receiver records a request before answering it, so by then it holds every
        webhook the relays delivered. The relays' totals gate the query.
        """
        if self.tally.settled < ROUTES * len(self.tally.committed):
            return False
        rows = await asyncio.to_thread(lambda: self.conn.execute(self.pending).fetchall())
        return not rows


def run_demo(orders: int, relays: int, workdir: str | None) -> int:
    """Run the demo with ``relays`` relays; returns the exit code (0: every check passed)."""
    console = Console()
    with _sigterm_as_interrupt(), _logs_through(console), ExitStack() as stack:
        began = time.monotonic()
        label = "starting embedded PostgreSQL, Kafka-compatible broker and webhook receiver"
        with console.status(label):
            scratch = stack.enter_context(_scratch_dir(workdir))
            # The receiver's process first: it comes up while the servers do.
            secret = new_secret()
            hook = stack.enter_context(Receiver(secret, scratch / "webhook.counts"))
            pg = stack.enter_context(EmbeddedPostgres(scratch))
            broker = stack.enter_context(EmbeddedBroker(log_dir=scratch))
            db = _prepare(pg.url, broker.bootstrap)
            stack.callback(db.dispose)
            settings = _relay_settings(pg.url, broker.bootstrap, scratch, hook.url, secret)
        startup = time.monotonic() - began
        tally = Tally()
        conn = stack.enter_context(connect(pg.url, autocommit=True))
        watch = _Watch(tally, hook, console, conn, relay_queries(settings.schema)["gauge_topics"])
        drained = asyncio.run(_pipeline(db, settings, orders, relays, watch))
        if drained is None:
            console.print(
                f"[red]timed out after {DRAIN_TIMEOUT_S:.0f} s: the relays made "
                f"{tally.delivered} of {ROUTES * len(tally.committed)} deliveries[/red]"
            )
            return 1
        committed = frozenset(tally.committed)
        arrivals = consume(broker.bootstrap, TOPIC, committed, time.monotonic() + CONSUME_TIMEOUT_S)
        outcome = Outcome(
            topic=TOPIC,
            committed=committed,
            rolled_back=len(tally.rolled_back),
            relays=drained.shares,
            startup_s=startup,
            spread_s=drained.spread_s,
            elapsed_s=drained.elapsed_s,
        )
        report = verify(outcome, arrivals)
        hooks = check_webhooks(HOOK_ROUTE, hook.url, hook.requests(), committed)
        print_summary(console, report, hooks)
        return 0 if report.ok and hooks.ok else 1


# --- set-up -------------------------------------------------------------------------------


@contextmanager
def _scratch_dir(workdir: str | None) -> Iterator[Path]:
    """A fresh directory for this run (inside ``workdir`` if given), always removed."""
    parent = Path(workdir) if workdir else _fast_tmp()
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="outbox-demo-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fast_tmp() -> Path:
    """tmpfs when usable: the app commits once per order, and fsync on disk is slow. Not
    when small: Docker's default /dev/shm (64 MB) cannot hold a fresh cluster and its WAL."""
    shm = Path("/dev/shm")  # noqa: S108 -- only the parent of a private mkdtemp()
    usable = shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)
    if usable and shutil.disk_usage(shm).free >= _MIN_SHM_FREE:
        return shm
    return Path(tempfile.gettempdir())


def _prepare(url: str, bootstrap: str) -> sqlalchemy.Engine:
    """Migrate the outbox, create the app's table and the topic; the app's engine."""
    with connect(url, autocommit=True) as conn:
        outbox_lib.migrate(conn)
    db = create_engine(sqlalchemy_url(url))
    Base.metadata.create_all(db)
    _create_topic(bootstrap)
    return db


def _create_topic(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=1)
    try:
        admin.create_topics([topic], operation_timeout=10)[TOPIC].result(timeout=15)
    except KafkaException as exc:
        raise RelayError(f"cannot create topic {TOPIC!r} on {bootstrap}: {exc}") from exc


# --- the sample app -------------------------------------------------------------------------


def write_orders(db: sqlalchemy.Engine, orders: int, tally: Tally, cancel: threading.Event) -> None:
    """One transaction per order: the row and its message commit, or vanish, together."""
    for order_id in range(1, orders + 1):
        if cancel.is_set():
            return
        try:
            _place_order(db, order_id, abandon=order_id % ROLLBACK_EVERY == 0)
        except _Abandon:
            tally.rolled_back.append(order_id)
        else:
            tally.committed.append(order_id)


def _place_order(db: sqlalchemy.Engine, order_id: int, *, abandon: bool) -> None:
    with Session(db) as session, session.begin():
        place_order(session, order_id, source="demo")
        if abandon:
            raise _Abandon  # after publish: the message must be rolled back with the order


# --- app and relays, concurrently -----------------------------------------------------------


def _relay_settings(url: str, bootstrap: str, scratch: Path, hook: str, secret: str) -> Settings:
    """What every relay of the demo runs with; its two routes come from a config file, the
    webhook's secret from the (demo's own) environment."""
    config = scratch / "relay.toml"
    config.write_text(_KAFKA_ROUTE_TOML + route_toml(HOOK_ROUTE, TOPIC, hook, _SECRET_ENV))
    return load_settings(
        {
            "database_url": url,
            "kafka_bootstrap_servers": bootstrap,
            "poll_interval": 0.2,
            "heartbeat_seconds": HEARTBEAT_S,
            "bucket_lease_seconds": BUCKET_LEASE_S,
        },
        # Not os.environ: stray OUTBOX_* variables must not redirect the demo.
        {_SECRET_ENV: secret},
        str(config),
    )


async def _pipeline(
    db: sqlalchemy.Engine, settings: Settings, orders: int, relays: int, watch: _Watch
) -> _Drained | None:
    """Start the relays, let them share the buckets, then write and drain at the same time.

    None if the outbox was not drained in time.
    """
    tally = watch.tally
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_relay(settings, stop=stop, on_start=tally.attach))
        for _ in range(relays)
    ]
    try:
        began = time.monotonic()
        await _until_spread(tally, tasks, watch.console)
        spread_s, began = time.monotonic() - began, time.monotonic()
        if not await _write_and_drain(db, orders, watch, tasks):
            return None
        # Before stopping: a stopping relay gives its buckets back.
        return _Drained(tally.shares(), spread_s, time.monotonic() - began)
    finally:
        # Also on Ctrl-C (this task is cancelled): let every relay hand back whatever it
        # holds before the servers go away.
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_spread(tally: Tally, relays: list[asyncio.Task[Any]], console: Console) -> None:
    """Wait until every relay runs and the buckets are evenly spread over them.

    Bounded by ``SPREAD_TIMEOUT_S``: past it the demo goes on (the relays keep rebalancing
    while they deliver); only its summary shows a less even spread.
    """
    deadline = time.monotonic() + SPREAD_TIMEOUT_S
    label = f"starting {len(relays)} relay(s), sharing out the {BUCKETS} key buckets"
    with console.status(label):
        while not tally.evenly_spread(len(relays)):
            _check_running(relays)
            if time.monotonic() >= deadline:
                console.print(
                    f"[yellow]the key buckets were not evenly spread after "
                    f"{SPREAD_TIMEOUT_S:.0f} s; writing orders anyway[/yellow]"
                )
                return
            await asyncio.sleep(_REFRESH_S)


async def _write_and_drain(
    db: sqlalchemy.Engine, orders: int, watch: _Watch, relays: list[asyncio.Task[Any]]
) -> bool:
    """Run the app's writer while the relays drain; True once the outbox is empty."""
    cancel = threading.Event()
    writer = asyncio.create_task(asyncio.to_thread(write_orders, db, orders, watch.tally, cancel))
    try:
        with _progress(watch.console) as progress:
            return await _until_drained(watch, orders, relays, writer, progress)
    finally:
        cancel.set()
        await asyncio.gather(writer, return_exceptions=True)


async def _until_drained(
    watch: _Watch,
    orders: int,
    relays: list[asyncio.Task[Any]],
    writer: asyncio.Task[None],
    progress: Progress,
) -> bool:
    tally, hook = watch.tally, watch.hook
    expected = orders - orders // ROLLBACK_EVERY
    written = progress.add_task("orders written", total=orders, note="")
    delivered = progress.add_task("kafka + webhook", total=ROUTES * expected, note="")
    accepted = progress.add_task("webhooks accepted", total=expected, note="")
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        progress.update(written, completed=tally.written)
        progress.update(delivered, completed=tally.delivered)
        progress.update(accepted, completed=hook.delivered, note=f"{hook.retried} retried")
        _check_running(relays)
        if writer.done():
            writer.result()
            if await watch.drained():
                return True
        await asyncio.sleep(_REFRESH_S)
    return False


def _check_running(relays: Sequence[asyncio.Task[Any]]) -> None:
    """Raise what stopped a relay, if one did (they run until the demo stops them)."""
    for relay in relays:
        if relay.done():
            relay.result()  # re-raises what stopped it
            raise RelayError("a relay stopped before the outbox was drained")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
    )


# --- process plumbing -----------------------------------------------------------------------


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM does what Ctrl-C does, so the servers this process started are stopped
    instead of orphaned (they run in sessions of their own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _as_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _as_sigint(signum: int, frame: FrameType | None) -> None:
    """Hand over to the current SIGINT handler: inside ``asyncio.run`` that one cancels the
    main task, so the relay is stopped in order rather than torn down mid-await."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job): still stop, the plain way
        raise KeyboardInterrupt


@contextmanager
def _logs_through(console: Console) -> Iterator[None]:
    """Route logs through rich so they print above the progress bars, and hide the INFO
    chatter (server start-up, relay start/stop) that the progress display replaces."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [RichHandler(console=console, show_path=False)]
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
