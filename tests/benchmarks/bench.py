"""outbox-relay benchmark: drain rate against a raw producer, a naive relay and faststream-outbox,
with several relay processes on one database, and commit-to-consume latency at a steady publish
rate. Not a test: it gates nothing.

Usage (``make bench`` runs the first line)::

    python -m tests.benchmarks.bench
    python -m tests.benchmarks.bench --messages 200000 --keys 1000 --payload-bytes 200 \\
        --out bench-results --database-url postgresql://... --kafka host:9092
    python -m tests.benchmarks.bench --only relay --batch-sizes 1000,2000,5000
    python -m tests.benchmarks.bench --only relay,relays --relay-counts 1,2,3 --quiet-wait 120
    python -m tests.benchmarks.bench --only webhooks --webhook-messages 20000 --webhook-repeat 3

Without ``--database-url`` / ``--kafka`` it starts an embedded PostgreSQL 18 (unix socket,
default settings: fsync and synchronous_commit on) and an in-memory Tansu broker, and stops
them at the end. A given database must allow ``CREATE SCHEMA``; every scenario works in its
own schema (``bench_*``), dropped when it ends.

Scenarios, in one run, on the same database and broker, each sending the same records
(``--messages`` of ``--payload-bytes`` JSON over ``--keys`` keys, the relay's headers, a
fresh ``--partitions``-partition topic each). Nothing prepares a table before it is
measured: no VACUUM, no ANALYZE; each meets what the commits (and autovacuum, as configured)
leave:

raw         one process producing the records with the relay's librdkafka settings, every
            delivery report read: the ceiling for any relay written in Python.
relay       ``relay.app.run_relay`` in-process, idle on an empty outbox, while a bulk job
            commits a backlog (10,000 messages per transaction): once per ``--drain-sizes``
            entry, and once per ``--pinned-sizes`` entry with another session holding a
            snapshot open throughout (a long transaction: nothing deleted can be vacuumed).
            Timed from the first commit until ``engine.stats.delivered`` reaches the backlog;
            checked in SQL (delivery rows, nothing left in message) and on the topic
            (records, duplicates); reports the WAL written per message (commits included)
            and the time spent inside each store/sink call.
relays      ``--relay-counts`` (1,2,3) ``python -m relay.cli run`` processes draining the same
            backlog together (batch: the first ``--batch-sizes`` entry). Timed from the
            moment all N have started and receive their even share of the 256 key buckets
            at once (the benchmark holds every bucket while they start, then lets go) until
            ``message`` is empty; buckets and deliveries per relay, SQL and topic checks as
            for relay. Details and why it is timed this way: relays.py. On a 2-core
            machine, 2 and 3 relays compete with PostgreSQL and the broker for the same
            cores: the rate says what this box does, not how far relays scale.
            raw, relay and relays run ``--repeat`` times, interleaved; the median run is shown.
naive       the loop most people write: SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED, produce,
            flush, DELETE, COMMIT per message; capped at ``--naive-seconds``, rest extrapolated.
faststream  faststream-outbox (``pip install faststream-outbox asyncpg``) relaying its own
            table to the same broker; capped at ``--faststream-seconds``. Reported as
            "unavailable" with the reason if it cannot run.
latency     the relay (own process, poll_interval 1 s: the NOTIFY path) while ``--publishers``
            threads publish through outbox_lib, one message per transaction, at
            ``--latency-rate`` msg/s for ``--latency-seconds``, right after the same relay
            drained a ``--latency-after`` backlog (its dead rows still there); once as is and
            once with a snapshot held open from before that drain; p50/p95/p99/max of
            consumer arrival minus commit.
webhooks    the webhook benchmark (``webhooks.py``, also runnable on its own): the relay
            draining ``--webhook-messages`` to a fast local endpoint at each
            ``--webhook-concurrency``, against httpx alone and a naive webhook relay, and a
            fast route beside a slow one; ``--webhook-repeat`` runs each, median shown. Kept
            small by default (it runs at webhook speed); its tables follow the others and it
            writes ``<out>/webhooks.json`` and ``<out>/webhooks.png``.

Each scenario also reports the CPU it used and what other processes used meanwhile: above a
quarter of a core it is flagged NOISY (and ``--quiet-wait`` waits for quiet before each one).

Output: a table per kind of figure on the terminal, ``<out>/results.json`` (every figure,
the latency samples, the environment) and ``<out>/bench.png`` (msg/s bars, latency CDF).
Profile a drain with ``py-spy record -o profile.svg -- python -m tests.benchmarks.bench
--only relay``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import confluent_kafka
from rich.console import Console

from . import report, webhooks
from . import workload as w
from .codeinfo import code_version
from .fs_outbox import FS_WORKERS, FsConfig, faststream_outbox
from .latency import Pace, steady_latency
from .machine import CpuWatch, Load
from .relays import processes, relays_drain
from .results import Latency, Throughput, failed, median_of_runs
from .throughput import Drain, naive_relay, raw_produce, relay_drain

SCENARIOS = ("raw", "relay", "relays", "naive", "faststream", "latency", "webhooks")
Result = Throughput | Latency
R = TypeVar("R", bound=Result)
# Other processes using more than this many cores during a scenario make its figures suspect.
NOISY_CORES = 0.25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench",
        description="Benchmark outbox-relay (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--messages", type=int, default=200_000, help="backlog size")
    add("--keys", type=int, default=1000, help="distinct message keys")
    add("--payload-bytes", type=int, default=200, help="JSON payload size (>= 128)")
    add("--partitions", type=int, default=8, help="partitions of each scenario's topic")
    add("--out", type=Path, default=Path("bench-results"), help="where results go")
    add("--database-url", help="PostgreSQL to use instead of an embedded one")
    add("--kafka", help="bootstrap servers to use instead of an embedded Tansu broker")
    add("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    add("--batch-sizes", default="1000", help="relay batch size (relay, relays, latency)")
    add("--drain-sizes", default="100000,200000,1000000",
        help="backlogs the relay drains while they commit (relay)")  # fmt: skip
    add("--pinned-sizes", default="200000",
        help="the same, with another session holding a snapshot open throughout")  # fmt: skip
    add("--relay-counts", default="1,2,3", help="relay processes sharing one database (relays)")
    add("--repeat", type=int, default=1,
        help="runs of raw, relay and relays, interleaved; median kept")  # fmt: skip
    add("--drain-timeout", type=float, default=600.0, help="give up on a relay drain after")
    add("--naive-seconds", type=float, default=20.0, help="cap on the naive relay")
    add("--faststream-seconds", type=float, default=60.0, help="cap on faststream-outbox")
    add("--faststream-workers", type=int, default=FS_WORKERS, help="its max_workers")
    add("--latency-rate", type=float, default=500.0, help="steady publish rate, msg/s")
    add("--latency-seconds", type=float, default=20.0, help="measured publishing time")
    add("--latency-warmup", type=float, default=2.0, help="publishing time not measured")
    add("--latency-after", type=int, default=200_000,
        help="backlog drained right before the latency is measured (0: none)")  # fmt: skip
    add("--publishers", type=int, default=1, help="publisher threads sharing the rate")
    add("--webhook-messages", type=int, default=5000, help="backlog of the webhooks scenario")
    add("--webhook-concurrency", default="64,16", help="route concurrency values (webhooks)")
    add("--webhook-repeat", type=int, default=1, help="runs of each webhooks step; median kept")
    add(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each scenario, wait up to this long for other processes to go quiet",
    )
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}")
    if args.payload_bytes < 128:
        parser.error("--payload-bytes must be at least 128 (the JSON order itself)")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.relay_counts = [int(n) for n in args.relay_counts.split(",") if n.strip()]
    args.drain_sizes = [int(n) for n in args.drain_sizes.split(",") if n.strip()]
    args.pinned_sizes = [int(n) for n in args.pinned_sizes.split(",") if n.strip()]
    if any(n < 1 for n in [*args.drain_sizes, *args.pinned_sizes]):
        parser.error("--drain-sizes and --pinned-sizes must be positive numbers of messages")
    if any(n < 1 for n in args.relay_counts):
        parser.error("--relay-counts must be positive numbers of relays")
    hooks = [c.strip() for c in args.webhook_concurrency.split(",") if c.strip()]
    if not hooks or not all(c.isdigit() and int(c) > 0 for c in hooks):
        parser.error("--webhook-concurrency must list positive numbers")
    return args


@dataclass(frozen=True, slots=True)
class Services:
    database_url: str
    bootstrap: str
    kind: str
    pids: tuple[int | None, ...]  # of what we started, so their CPU counts as the benchmark's


@contextlib.contextmanager
def services(database_url: str | None, kafka: str | None) -> Iterator[Services]:
    """The given services, or embedded ones started here and always stopped."""
    from relay.embedded import EmbeddedBroker, EmbeddedPostgres

    with contextlib.ExitStack() as stack:
        kinds, pids = [], []
        if database_url is None:
            # As root the wheel runs postgres as its own user: a fresh 0o755 dir under /tmp.
            workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-", dir="/tmp"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            postgres = stack.enter_context(EmbeddedPostgres(workdir))
            database_url, kinds, pids = postgres.url, ["embedded PostgreSQL"], [postgres.pid]
        if kafka is None:
            broker = stack.enter_context(EmbeddedBroker())
            kafka = broker.bootstrap
            kinds.append("embedded Tansu (memory)")
            pids.append(broker.pid)
        yield Services(database_url, kafka, " + ".join(kinds) or "given", tuple(pids))


class Run:
    """Runs the chosen scenarios in order, keeping going past a failing one."""

    def __init__(self, args: argparse.Namespace, target: w.Target, console: Console,
                 cpu: CpuWatch) -> None:  # fmt: skip
        self.args = args
        self.target = target
        self.console = console
        self.cpu = cpu
        self.throughput: list[Throughput] = []
        self.latency: list[Latency] = []

    def all(self) -> None:
        plan = self._plan()
        for index, (label, step) in enumerate(plan, start=1):
            self.console.rule(f"[{index}/{len(plan)}] {label}")
            self._wait_for_quiet()
            started = time.perf_counter()
            self._guarded(label, step)
            self.console.print(f"done in {time.perf_counter() - started:.1f} s")

    def _plan(self) -> list[tuple[str, Callable[[], Result]]]:
        a, t = self.args, self.target
        steps: list[tuple[str, Callable[[], Result]]] = []
        for run in range(1, a.repeat + 1):
            steps += self._repeated(f" (run {run} of {a.repeat})" if a.repeat > 1 else "")
        if "naive" in a.only:
            steps.append(("naive relay", lambda: naive_relay(t, a.naive_seconds)))
        if "faststream" in a.only:
            config = FsConfig(max_workers=a.faststream_workers)
            steps.append(("faststream-outbox",
                          lambda: faststream_outbox(t, a.faststream_seconds, config)))  # fmt: skip
        if "latency" in a.only:
            pace = Pace(a.latency_rate, a.latency_seconds, a.latency_warmup, a.publishers)
            size, after = a.batch_sizes[0], a.latency_after
            for pinned in (False, True):
                label = f"latency at {a.latency_rate:.0f} msg/s after a {after:,} drain"
                steps.append((label + (", xmin pinned" if pinned else ""),
                              _bind(steady_latency, t, pace, size, after, pinned)))  # fmt: skip
        return steps

    def _repeated(self, of: str) -> list[tuple[str, Callable[[], Result]]]:
        """One run of each repeated scenario (raw, relay, relays)."""
        a, t = self.args, self.target
        steps: list[tuple[str, Callable[[], Result]]] = []
        if "raw" in a.only:
            steps.append((f"raw produce{of}", lambda: raw_produce(t)))
        if "relay" in a.only:
            drains = [Drain(n, a.batch_sizes[0]) for n in a.drain_sizes]
            drains += [Drain(n, a.batch_sizes[0], pinned=True) for n in a.pinned_sizes]
            for drain in drains:
                steps.append((f"{drain.name}{of}", _bind(relay_drain, t, drain, a.drain_timeout)))
        if "relays" in a.only:
            size = a.batch_sizes[0]
            for count in a.relay_counts:
                several = _bind(relays_drain, t, count, size, a.drain_timeout)
                steps.append((f"{processes(count)}, batch {size}{of}", several))
        return steps

    def _wait_for_quiet(self) -> None:
        if self.args.quiet_wait <= 0:
            return
        others = self.cpu.others_now()
        if others > NOISY_CORES:
            self.console.print(f"other processes use {others:.1f} cores; waiting up to "
                               f"{self.args.quiet_wait:.0f} s for them to settle")  # fmt: skip
            self.cpu.wait_for_quiet(NOISY_CORES, self.args.quiet_wait)

    def _guarded(self, label: str, step: Callable[[], Result]) -> None:
        self.cpu.start()
        try:
            result = step()
        except Exception as exc:
            self.console.print(traceback.format_exc(), markup=False, highlight=False)
            result = failed(label, exc)
        self._note_load(result, self.cpu.stop())
        if isinstance(result, Latency):
            self.latency.append(result)
            cuts = result.percentiles()
            self.console.print(f"p50 {cuts.get('p50', 0):.1f} ms, p99 {cuts.get('p99', 0):.1f} ms")
        else:
            self.throughput.append(result)
            rate = f"{result.rate:,.0f} msg/s" if result.rate else result.status
            self.console.print(f"{result.scenario}: {rate}; {result.note}")

    def _note_load(self, result: Result, load: Load) -> None:
        result.details["load"] = asdict(load)
        self.console.print(f"CPU during the scenario: {load.describe()}")
        if load.other_cores + load.steal_cores > NOISY_CORES:
            taken = load.other_cores + load.steal_cores
            result.note += f"; NOISY: others took {taken:.1f} cores"
            self.console.print(f"[yellow]warning: {load.describe()}; figures are depressed")


def _bind(fn: Callable[..., R], *args: Any) -> Callable[[], R]:
    return lambda: fn(*args)


def environment(url: str, services_kind: str, kafka: str) -> dict[str, Any]:
    with w.connect(url) as conn:
        row = conn.execute(w.query("server_facts")).fetchone()
    version, shared_buffers, sync_commit, fsync = row if row else ("?", "?", "?", "?")
    return {
        "services": services_kind,
        "postgres": {"version": version, "shared_buffers": shared_buffers,
                     "synchronous_commit": sync_commit, "fsync": fsync},
        "kafka": kafka,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "confluent_kafka": confluent_kafka.version(),
        "librdkafka": confluent_kafka.libversion()[0],
        "code": code_version(),
    }  # fmt: skip


def headline(workload: w.Workload, env: dict[str, Any]) -> str:
    return (f"{workload.messages:,} messages, {workload.keys:,} keys, {workload.payload_bytes} B "
            f"payloads, {workload.partitions} partitions; PostgreSQL "
            f"{env['postgres']['version']}, {env['cpus']} CPUs")  # fmt: skip


def _webhook_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"messages": args.webhook_messages, "keys": args.keys,
            "payload_bytes": args.payload_bytes,
            "concurrency": [int(c) for c in args.webhook_concurrency.split(",") if c.strip()],
            "repeat": args.webhook_repeat, "naive_seconds": args.naive_seconds,
            "timeout": args.drain_timeout, "quiet_wait": args.quiet_wait}  # fmt: skip


def _webhooks(args: argparse.Namespace, url: str, found: Services,
              console: Console) -> webhooks.Report | None:  # fmt: skip
    """The webhooks section: its own backlog (``--webhook-messages``), PostgreSQL only; None
    (the traceback printed) if it cannot run, so the other scenarios' figures are kept."""
    console.rule("webhooks")
    given = _webhook_args(args)
    options = webhooks.Options(**{**given, "concurrency": tuple(given["concurrency"])})
    postgres_pid = found.pids[0] if args.database_url is None else None
    try:
        return webhooks.run_suite(url, postgres_pid, found.kind, options, console, args.out)
    except Exception:
        console.print(traceback.format_exc(), markup=False, highlight=False)
        return None


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the services are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Piped output (make, CI logs) gets room for the tables instead of rich's 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 170)
    began = time.perf_counter()
    generated = max([*args.drain_sizes, *args.pinned_sizes, args.latency_after])
    workload = w.Workload(
        args.messages, args.keys, args.payload_bytes, args.partitions, generated=generated
    )
    with services(args.database_url, args.kafka) as found:
        url = found.database_url
        env = environment(url, found.kind, found.bootstrap)
        console.print(f"services: {found.kind}; PostgreSQL {env['postgres']['version']}")
        target = w.Target(url, found.bootstrap, workload)
        run = Run(args, target, console, CpuWatch(found.pids))
        if set(args.only) - {"webhooks"}:
            load_s = w.prepare_source(url, workload)
            console.print(f"backlog of {workload.source_rows:,} generated in {load_s:.1f} s")
            try:
                run.all()
            finally:
                w.drop_schema(url, w.SOURCE_SCHEMA)
        hooks = _webhooks(args, url, found, console) if "webhooks" in args.only else None
    total = time.perf_counter() - began
    title = headline(workload, env)
    run.throughput = median_of_runs(run.throughput)
    report.show(console, run.throughput, run.latency, title)
    if hooks is not None:
        hooks.meta = {"args": {"from": "bench.py", **_webhook_args(args)}}
        webhooks.publish(hooks, console, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"args": {k: v for k, v in vars(args).items() if k not in ("database_url", "out")},
            "environment": env, "total_seconds": total}  # fmt: skip
    report.write_json(args.out / "results.json", meta, run.throughput, run.latency)
    report.plot(args.out / "bench.png", run.throughput, run.latency, title)
    console.print(f"full run {total:.0f} s; wrote {args.out / 'results.json'} and "
                  f"{args.out / 'bench.png'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
