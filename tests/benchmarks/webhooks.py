"""Webhook benchmark: the relay draining a backlog to a fast local endpoint, next to what
httpx alone and a naive relay reach on the same machine, and whether a slow endpoint holds a
fast one back. Not a test: it gates nothing.

Usage (``make bench`` runs it as its ``webhooks`` section, see ``bench.py``)::

    python -m tests.benchmarks.webhooks
    python -m tests.benchmarks.webhooks --messages 20000 --keys 1000 --payload-bytes 200 \\
        --concurrency 64,16 --repeat 3 --out bench-results --database-url postgresql://...
    python -m tests.benchmarks.webhooks --only drain,ceiling --profile 10

Without ``--database-url`` it starts an embedded PostgreSQL 18 (unix socket, default
settings). Endpoints are ``tests.harness.fast_webhook`` servers in their own processes
(``/stats`` counts requests and distinct ``webhook-id``s, and verifies 1 signature in 1000);
the slow one answers each request ``--slow-delay`` seconds late. Every route has
``allow_private_network = true`` and a real ``whsec_`` secret.

Sections (``--only``), each run ``--repeat`` times, interleaved; the median run is shown:

drain      the backlog (``--messages`` of ``--payload-bytes`` JSON over ``--keys`` keys,
           bulk-loaded) drained by ``run_relay`` in-process with one webhook route, at each
           ``--concurrency``; timed from the call until the route's last delivery row is
           committed. Checked in SQL (delivery rows = distinct messages = backlog, nothing
           left) and at the endpoint (requests = ids = backlog, no bad signature).
ceiling    the same messages, headers and endpoint without a database: httpx with the
           relay's client settings (one pool of ``concurrency`` connections, as the relay
           has), httpx with one single-connection client per coroutine, and the relay's
           ``WebhookSink.deliver``. The first is the ceiling of the relay as it is built.
naive      one row per transaction: SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED, a signed POST
           with a synchronous httpx.Client, DELETE ... INSERT INTO delivery, COMMIT; capped
           at ``--naive-seconds``, the rest extrapolated.
isolation  the odd half of the backlog on topic ``wh.fast`` (route ``fast``), the even half
           on ``wh.slow`` (route ``slow``, the slow endpoint), same concurrency (the first
           ``--concurrency``); the fast route's rate (until all its messages are delivered)
           against a run with the fast route and its messages alone. The issue allows the
           slow endpoint to cost the fast route at most 10%.
fanout     the fast topic's messages routed to both endpoints; the fast route against alone.

Each run reports CPU seconds per 1,000 deliveries of this process (the relay or the client),
of PostgreSQL (postmaster and backends) and of the endpoint, and the WAL written per message
(``pg_current_wal_lsn`` before and after, the whole cluster). ``--profile N`` adds one fast
drain under cProfile for N seconds and prints the top 15 functions by tottime and cumtime
(the profile itself goes to ``<out>/webhooks-profile.prof``).

Output: tables on the terminal, ``<out>/webhooks.json`` and ``<out>/webhooks.png``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import logging
import os
import platform
import pstats
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx
import psutil
from rich.console import Console

from tests.harness.fast_webhook import FastWebhookProcess

from . import webhook_report as report
from . import workload as w
from .codeinfo import code_version, fingerprint
from .machine import CpuWatch
from .results import Throughput, failed, median_of_runs
from .webhook_lanes import ALONE, FAN_OUT, TWO_TOPICS, fast_drain, isolation, profile_drain
from .webhook_senders import (
    Endpoint,
    Meter,
    backlog_messages,
    httpx_ceiling,
    naive_webhook,
    sink_ceiling,
)

SECTIONS = ("drain", "ceiling", "naive", "isolation", "fanout")
SOURCE = "bench_wh_src"
NOISY_CORES = 0.25
PROFILE_TOP = 15


@dataclass(frozen=True)
class Options:
    """What the webhook benchmark runs; ``bench.py`` fills it from its own flags."""

    messages: int = 20_000
    keys: int = 1000
    payload_bytes: int = 200
    concurrency: tuple[int, ...] = (64, 16)
    repeat: int = 3
    sections: tuple[str, ...] = SECTIONS
    naive_seconds: float = 20.0
    slow_delay: float = 1.0
    timeout: float = 600.0
    profile_seconds: float = 0.0
    quiet_wait: float = 60.0


@dataclass
class Report:
    rows: list[Throughput]
    headline: str
    environment: dict[str, Any]
    profile: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


class Suite:
    """Runs the chosen sections against one database, keeping going past a failing step."""

    def __init__(
        self, url: str, postgres_pid: int | None, options: Options, console: Console
    ) -> None:
        self.url, self.options, self.console = url, options, console
        self.postgres = _process(postgres_pid)
        self.cpu = CpuWatch([postgres_pid])
        self.rows: list[Throughput] = []
        self.profile: dict[str, Any] | None = None

    def run(self, out: Path) -> None:
        o = self.options
        workload = w.Workload(o.messages, o.keys, o.payload_bytes, 1)
        load_s = w.prepare_source(self.url, workload, SOURCE)
        self.console.print(f"webhook backlog of {o.messages:,} generated in {load_s:.1f} s")
        secret = new_secret()
        try:
            with (
                FastWebhookProcess(secret=secret) as fast_server,
                FastWebhookProcess(delay=o.slow_delay, secret=secret) as slow_server,
            ):
                fast, slow = Endpoint(fast_server, secret), Endpoint(slow_server, secret)
                meter = Meter(
                    {
                        "postgres": self.postgres,
                        "endpoint": _process(fast_server.proc),
                        "slow endpoint": _process(slow_server.proc),
                    }
                )
                self._steps(self._plan(fast, slow, meter))
                if o.profile_seconds > 0:
                    self._profile(fast, meter, out)
        finally:
            w.drop_schema(self.url, SOURCE)
        self.rows = median_of_runs(self.rows)

    def _plan(
        self, fast: Endpoint, slow: Endpoint, meter: Meter
    ) -> list[tuple[str, Callable[[], Throughput]]]:
        o, url = self.options, self.url
        messages = backlog_messages(url, SOURCE, "wh.ceiling")
        steps: list[tuple[str, Callable[[], Throughput]]] = []
        for run in range(1, o.repeat + 1):
            of = f" (run {run} of {o.repeat})" if o.repeat > 1 else ""
            for c in o.concurrency:
                if "ceiling" in o.sections:
                    steps += [
                        (
                            f"httpx alone, 1 client, concurrency {c}{of}",
                            _bind(httpx_ceiling, fast, messages, c, meter),
                        ),
                        (
                            f"httpx alone, {c} clients, concurrency {c}{of}",
                            _bind(httpx_ceiling, fast, messages, c, meter, True),
                        ),
                        (
                            f"WebhookSink alone, concurrency {c}{of}",
                            _bind(sink_ceiling, fast, messages, c, meter),
                        ),
                    ]
                if "drain" in o.sections:
                    steps.append(
                        (
                            f"relay drain, concurrency {c}{of}",
                            _bind(fast_drain, url, SOURCE, fast, c, meter, o.timeout),
                        )
                    )
            c = o.concurrency[0]
            beside = [
                v
                for v, section in ((TWO_TOPICS, "isolation"), (FAN_OUT, "fanout"))
                if section in o.sections
            ]
            for variant in (ALONE, *beside) if beside else ():
                steps.append(
                    (
                        f"isolation: {variant}, concurrency {c}{of}",
                        _bind(isolation, url, SOURCE, fast, slow, c, variant, meter, o.timeout),
                    )
                )
        if "naive" in o.sections:
            steps.append(
                (
                    "naive webhook relay",
                    _bind(naive_webhook, url, SOURCE, fast, o.naive_seconds, meter),
                )
            )
        return steps

    def _steps(self, plan: list[tuple[str, Callable[[], Throughput]]]) -> None:
        for index, (label, step) in enumerate(plan, start=1):
            self.console.rule(f"[webhooks {index}/{len(plan)}] {label}")
            if self.options.quiet_wait > 0 and self.cpu.others_now() > NOISY_CORES:
                self.cpu.wait_for_quiet(NOISY_CORES, self.options.quiet_wait)
            self.rows.append(self._guarded(label, step))

    def _guarded(self, label: str, step: Callable[[], Throughput]) -> Throughput:
        self.cpu.start()
        started = time.perf_counter()
        try:
            result = step()
        except Exception as exc:
            self.console.print(traceback.format_exc(), markup=False, highlight=False)
            result = failed(label, exc)
        load = self.cpu.stop()
        result.details["load"] = asdict(load)
        if load.other_cores + load.steal_cores > NOISY_CORES:
            result.note += f"; NOISY: others took {load.other_cores + load.steal_cores:.1f} cores"
        rate = f"{result.rate:,.0f}/s" if result.rate else result.status
        self.console.print(
            f"{result.scenario}: {rate} in {time.perf_counter() - started:.1f} s; {result.note}",
            markup=False,
            highlight=False,
        )
        return result

    def _profile(self, fast: Endpoint, meter: Meter, out: Path) -> None:
        o, c = self.options, self.options.concurrency[0]
        self.console.rule(f"[webhooks] relay drain under cProfile, {o.profile_seconds:.0f} s")
        profiler, delivered = profile_drain(self.url, SOURCE, fast, c, meter, o.profile_seconds)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "webhooks-profile.prof"
        profiler.dump_stats(path)
        self.profile = {
            "concurrency": c,
            "seconds": o.profile_seconds,
            "delivered": delivered,
            "file": str(path),
            "tottime": _top(profiler, "tottime"),
            "cumtime": _top(profiler, "cumulative"),
            "by_package": report.profile_by_package(pstats.Stats(profiler).stats),  # type: ignore[attr-defined]
        }


def _top(profiler: Any, key: str) -> str:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.strip_dirs().sort_stats(key).print_stats(PROFILE_TOP)
    return text.getvalue()


def _process(pid_or_popen: Any) -> psutil.Process | None:
    pid = getattr(pid_or_popen, "pid", pid_or_popen)
    if pid is None:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _bind(fn: Callable[..., Throughput], *args: Any) -> Callable[[], Throughput]:
    return lambda: fn(*args)


def environment(url: str, services: str) -> dict[str, Any]:
    with w.connect(url) as conn:
        row = conn.execute(w.query("server_facts")).fetchone()
    version, shared_buffers, sync_commit, fsync = row if row else ("?", "?", "?", "?")
    return {
        "services": services,
        "postgres": {
            "version": version,
            "shared_buffers": shared_buffers,
            "synchronous_commit": sync_commit,
            "fsync": fsync,
        },
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "httpx": httpx.__version__,
        "httpcore": httpcore.__version__,
        "code": code_version(),
    }


def run_suite(
    url: str, postgres_pid: int | None, services: str, options: Options, console: Console, out: Path
) -> Report:
    """Every chosen section on the database at ``url``; bench.py calls this too."""
    env = environment(url, services)
    suite = Suite(url, postgres_pid, options, console)
    suite.run(out)
    if fingerprint() != env["code"].get("fingerprint"):
        env["code"]["changed_during_run"] = True
        console.print(
            "[yellow]warning: relay/outbox_lib/migrations files changed during the "
            "run: later steps may have measured other code than earlier ones"
        )
    o = options
    headline = (
        f"{o.messages:,} messages, {o.keys:,} keys, {o.payload_bytes} B payloads; "
        f"PostgreSQL {env['postgres']['version']}, {env['cpus']} CPUs, "
        f"httpx {env['httpx']}"
    )
    return Report(suite.rows, headline, env, suite.profile)


def publish(report_: Report, console: Console, out: Path) -> None:
    """Tables on the terminal, ``webhooks.json`` and ``webhooks.png`` under ``out``."""
    report.show(console, report_.rows, report_.headline, report_.profile)
    out.mkdir(parents=True, exist_ok=True)
    document = {**report_.meta, "environment": report_.environment}
    report.write_json(out / "webhooks.json", document, report_.rows, report_.profile)
    report.plot(out / "webhooks.png", report_.rows, report_.headline)
    console.print(f"wrote {out / 'webhooks.json'} and {out / 'webhooks.png'}")


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.webhooks",
        description="Benchmark the relay's webhook routes (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d, add = Options(), parser.add_argument
    add("--messages", type=int, default=d.messages, help="backlog size")
    add("--keys", type=int, default=d.keys, help="distinct message keys")
    add("--payload-bytes", type=int, default=d.payload_bytes, help="JSON payload size (>= 128)")
    add(
        "--concurrency",
        default=",".join(map(str, d.concurrency)),
        help="route concurrency values to drain with (the first also for isolation)",
    )
    add("--repeat", type=int, default=d.repeat, help="runs of each step, interleaved; median kept")
    add("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    add("--naive-seconds", type=float, default=d.naive_seconds, help="cap on the naive relay")
    add("--slow-delay", type=float, default=d.slow_delay, help="seconds the slow endpoint waits")
    add("--timeout", type=float, default=d.timeout, help="give up on a drain after")
    add(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also profile a drain (first concurrency) with cProfile for this long",
    )
    add(
        "--quiet-wait",
        type=float,
        default=d.quiet_wait,
        help="before each step, wait up to this long for other processes to go quiet",
    )
    add("--out", type=Path, default=Path("bench-results"), help="where results go")
    add("--database-url", help="PostgreSQL to use instead of an embedded one")
    args = parser.parse_args(argv)
    args.only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    if set(args.only) - set(SECTIONS):
        parser.error(f"unknown section(s) {sorted(set(args.only) - set(SECTIONS))}")
    args.concurrency = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency must list positive numbers")
    if args.payload_bytes < 128:
        parser.error("--payload-bytes must be at least 128 (the JSON order itself)")
    return args


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        args.messages,
        args.keys,
        args.payload_bytes,
        args.concurrency,
        args.repeat,
        args.only,
        args.naive_seconds,
        args.slow_delay,
        args.timeout,
        args.profile,
        args.quiet_wait,
    )


@contextlib.contextmanager
def database(url: str | None) -> Iterator[tuple[str, int | None, str]]:
    """(url, postmaster pid, description): the given database, or an embedded one."""
    if url is not None:
        yield url, None, "given"
        return
    from relay.embedded import EmbeddedPostgres

    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-", dir="/tmp"))
    try:
        with EmbeddedPostgres(workdir) as postgres:
            yield postgres.url, postgres.pid, "embedded PostgreSQL"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(width=None if sys.stdout.isatty() else 170)
    began = time.perf_counter()
    options = options_from(args)
    with database(args.database_url) as (url, pid, kind):
        console.print(f"services: {kind}")
        result = run_suite(url, pid, kind, options, console, args.out)
    total = time.perf_counter() - began
    result.meta = {
        "args": {k: v for k, v in vars(args).items() if k not in ("database_url", "out")},
        "total_seconds": total,
    }
    publish(result, console, args.out)
    console.print(f"full run {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
