"""Commit-to-consume latency with the relay running and an application publishing steadily.

The relay runs in its own process (as it is deployed), with ``poll_interval`` 1 s, so what
is measured is the NOTIFY wake-up path, not polling. Publisher threads write one message per
transaction through ``outbox_lib`` (``Outbox(schema=...).publish``, which is what
``outbox_lib.publish`` calls for the default schema) and note ``time.time()`` right after
each commit; a consumer assigned to every partition (no group join) notes arrival times.
Message numbers travel in the payload. Besides commit-to-consume, the result splits the time:
commit to the broker's acknowledgement (the relay process notes each delivery report),
commit to the relay's produce call (the record's CreateTime) and produce to arrival.

As a relay meets it after an outage: before the steady publishing starts, a backlog of
``after_drain`` messages (another topic) is committed and drained by the same relay, so the
table holds what a drain leaves behind (dead rows, stale statistics), untouched by VACUUM or
ANALYZE. With ``pinned``, a session holds a snapshot open from before that backlog to the end,
so nothing the drain deleted can be cleaned up while the latency is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

import outbox_lib
from relay.app import run_relay
from relay.config import Route, load_settings
from relay.sinks.base import Delivered, Outbound, Result
from relay.sinks.kafka import KafkaSink

from . import workload as w
from .results import Latency

SCHEMA = "bench_latency"
PROBE = -1
READY_TIMEOUT_S = 30.0
STRAGGLER_WAIT_S = 10.0
DRAIN_FIRST_TIMEOUT_S = 1800.0


@dataclass(frozen=True, slots=True)
class Pace:
    """``rate`` messages/s in total for ``warmup`` + ``seconds``, from ``threads`` publishers."""

    rate: float
    seconds: float
    warmup: float
    threads: int


def steady_latency(
    target: w.Target, pace: Pace, batch_size: int, after_drain: int = 0, pinned: bool = False
) -> Latency:
    url = target.database_url
    topic = w.new_topic(target.bootstrap, "latency", target.workload.partitions)
    w.fresh_schema(url, SCHEMA)
    with w.connect(url) as conn:
        outbox_lib.migrate(conn, SCHEMA)
    acks_file = Path(tempfile.mkdtemp(prefix="outbox-bench-acks-")) / "acks.json"
    relay = _start_relay(target, batch_size, topic, acks_file)
    arrivals = Arrivals(target.bootstrap, topic)
    arrivals.start()
    try:
        with w.pinned_snapshot(url, SCHEMA) if pinned else contextlib.nullcontext():
            publishers = Publishers(target, topic, pace)
            publishers.probe(arrivals)
            drained_s = _drain_first(target, after_drain)
            commits = publishers.run()
            arrivals.wait_for(commits.keys(), STRAGGLER_WAIT_S)
    finally:
        _stop_relay(relay)
        arrivals.stop()
        w.drop_schema(url, SCHEMA)
    acked = _acks(acks_file)
    return _result(pace, publishers, commits, arrivals, acked, after_drain, drained_s, pinned)


def _acks(path: Path) -> dict[int, float]:
    """What the relay process noted: message number -> broker acknowledgement time."""
    try:
        return {int(n): t for n, t in orjson.loads(path.read_bytes()).items()}
    except FileNotFoundError:
        return {}
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def _drain_first(target: w.Target, size: int) -> float:
    """Commit ``size`` backlog messages (another topic) and wait until the relay has drained
    them (``message`` empty); returns the seconds that took."""
    if not size:
        return 0.0
    url = target.database_url
    topic = w.new_topic(target.bootstrap, "latency-drain", target.workload.partitions)
    started = time.perf_counter()
    w.commit_backlog(url, SCHEMA, topic, size, chunk=10_000)
    probe = w.query("first_message", schema=SCHEMA)
    with w.connect(url) as conn:
        while conn.execute(probe).fetchone() is not None:
            if time.perf_counter() - started > DRAIN_FIRST_TIMEOUT_S:
                raise RuntimeError(f"the relay did not drain {size:,} messages in time")
            time.sleep(0.05)
    return time.perf_counter() - started


def _result(
    pace: Pace,
    publishers: Publishers,
    commits: dict[int, float],
    got: Arrivals,
    acked: dict[int, float],
    after_drain: int,
    drained_s: float,
    pinned: bool,
) -> Latency:
    measured = [n for n in commits if n >= publishers.first_measured]
    samples = [1000 * (got.times[n] - commits[n]) for n in measured if n in got.times]
    # Where the time goes: commit to the relay's produce call (the relay's own part), then
    # produce to arrival (producer, broker and consumer). Record timestamps are whole ms.
    picked = [1000 * (got.produced[n] - commits[n]) for n in measured if n in got.produced]
    carried = [1000 * (got.times[n] - got.produced[n]) for n in measured if n in got.produced]
    # Commit to the broker's acknowledgement, as the relay's delivery report saw it: what
    # reaches the broker, without the consumer's fetch.
    to_broker = [1000 * (acked[n] - commits[n]) for n in measured if n in acked]
    missing = len(measured) - len(samples)
    note = (f"{pace.threads} publisher threads, 1 message per transaction; relay in its own "
            f"process, poll_interval 1 s; {pace.warmup:.0f} s warm-up excluded")  # fmt: skip
    if after_drain:
        note += f"; right after draining {after_drain:,} ({drained_s:.0f} s)"
    if pinned:
        note += "; a snapshot held open throughout"
    if missing:
        note += f"; {missing} never arrived within {STRAGGLER_WAIT_S:.0f} s"
    where = f", after a {after_drain:,} drain" if after_drain else ""
    where += ", xmin pinned" if pinned else ""
    return Latency(
        f"outbox-relay at {pace.rate:.0f} msg/s{where}", pace.rate, publishers.achieved_rate,
        published=len(measured), received=len(samples), samples_ms=samples,
        status="ok" if not missing else "partial", note=note,
        details={"duplicates": got.duplicates,
                 "commit_ms_p50": publishers.commit_ms_p50(), "after_drain": after_drain,
                 "commit_to_produce_ms": _cuts(picked), "produce_to_arrival_ms": _cuts(carried),
                 "commit_to_broker_ms": _cuts(to_broker), "broker_acked": len(to_broker),
                 "drain_first_s": drained_s, "pinned": pinned},
    )  # fmt: skip


def _cuts(samples_ms: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``samples_ms`` (empty when there are none)."""
    if len(samples_ms) < 2:
        return {}
    cuts = statistics.quantiles(sorted(samples_ms), n=100, method="inclusive")
    return {"p50": round(cuts[49], 1), "p95": round(cuts[94], 1), "p99": round(cuts[98], 1)}


# --- the relay, as its own process ----------------------------------------------------------


def _relay_main(flags: dict[str, Any], topic: str, acks_path: str) -> None:
    """Child process: run the relay until SIGTERM (run_relay installs the handlers), noting
    when the broker acknowledged each message of ``topic`` (its delivery report: the broker
    has it, acks=all); written to ``acks_path`` as {n: unix time} on the way out."""
    logging.basicConfig(level=logging.WARNING)
    acks: dict[int, float] = {}
    send = KafkaSink.send

    async def noting(self: KafkaSink, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        results = await send(self, route, batch)
        for message, result in zip(batch, results, strict=True):
            if message.topic == topic and isinstance(result, Delivered):
                acks.setdefault(orjson.loads(message.payload)["n"], result.acked_at)
        return results

    KafkaSink.send = noting  # type: ignore[method-assign]
    try:
        asyncio.run(run_relay(load_settings(flags, env={})))
    finally:
        Path(acks_path).write_bytes(orjson.dumps({str(n): t for n, t in acks.items()}))


def _start_relay(
    target: w.Target, batch_size: int, topic: str, acks_path: Path
) -> multiprocessing.process.BaseProcess:
    flags = {"database_url": target.database_url, "schema": SCHEMA, "batch_size": batch_size,
             "kafka_bootstrap_servers": target.bootstrap, "poll_interval": 1.0}  # fmt: skip
    process = multiprocessing.get_context("spawn").Process(
        target=_relay_main, args=(flags, topic, str(acks_path)), name="outbox-relay", daemon=True
    )
    process.start()
    return process


def _stop_relay(process: multiprocessing.process.BaseProcess) -> None:
    process.terminate()  # SIGTERM: the relay finishes in-flight work and releases claims
    process.join(15)
    if process.is_alive():
        process.kill()
        process.join(5)


# --- publishers -----------------------------------------------------------------------------


class Publishers:
    """Threads publishing on a shared schedule: message ``n`` is due at ``start + n / rate``."""

    def __init__(self, target: w.Target, topic: str, pace: Pace) -> None:
        self.topic = topic
        self.pace = pace
        self.keys = target.workload.keys
        self.payload_bytes = target.workload.payload_bytes
        self.outbox = outbox_lib.Outbox(schema=SCHEMA)
        url = "postgresql+psycopg://" + target.database_url.split("://", 1)[1]
        self.engine = create_engine(url, pool_size=pace.threads, max_overflow=0)
        self.first_measured = round(pace.rate * pace.warmup)
        self.achieved_rate = 0.0
        self._commit_s: list[float] = []

    def probe(self, arrivals: Arrivals) -> None:
        """One message end to end first, so the relay and consumer are surely running."""
        self._publish(PROBE)
        if not arrivals.wait_for([PROBE], READY_TIMEOUT_S):
            raise RuntimeError(f"the relay delivered nothing within {READY_TIMEOUT_S:.0f} s")

    def run(self) -> dict[int, float]:
        total = round(self.pace.rate * (self.pace.warmup + self.pace.seconds))
        commits: dict[int, float] = {}
        start = time.perf_counter() + 0.05
        threads = [threading.Thread(target=self._loop, args=(i, total, start, commits))
                   for i in range(self.pace.threads)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        measured = total - self.first_measured
        self.achieved_rate = measured / (time.perf_counter() - start - self.pace.warmup)
        self.engine.dispose()
        return commits

    def _loop(self, first: int, total: int, start: float, commits: dict[int, float]) -> None:
        for n in range(first, total, self.pace.threads):
            delay = start + n / self.pace.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            commits[n] = self._publish(n)

    def _publish(self, n: int) -> float:
        began = time.perf_counter()
        with Session(self.engine) as session, session.begin():
            self.outbox.publish(
                session, self.topic, self._payload(n), key=f"customer-{n % self.keys}",
                headers={"tenant": "acme", "trace-id": uuid.uuid4().hex},
            )  # fmt: skip
        committed = time.time()
        self._commit_s.append(time.perf_counter() - began)
        return committed

    def _payload(self, n: int) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "n": n,
            "order_id": 1_000_000 + n,
            "customer": f"customer-{n}",
            "amount_cents": n * 7919 % 100_000,
            "currency": "EUR",
            "note": "",
        }
        pad = self.payload_bytes - len(orjson.dumps(doc))
        doc["note"] = "x" * max(0, pad)
        return doc

    def commit_ms_p50(self) -> float:
        ordered = sorted(self._commit_s)
        return 1000 * ordered[len(ordered) // 2] if ordered else 0.0


# --- the consumer ---------------------------------------------------------------------------


@dataclass
class Arrivals:
    """A consumer thread noting when each message number first arrives."""

    bootstrap: str
    topic: str
    times: dict[int, float] = field(default_factory=dict)
    # When the relay produced each record: its CreateTime (ms), set by the relay's producer.
    produced: dict[int, float] = field(default_factory=dict)
    duplicates: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "enable.partition.eof": False, "fetch.wait.max.ms": 5,
        })  # fmt: skip
        meta = consumer.list_topics(self.topic, timeout=10.0).topics[self.topic]
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        self._thread = threading.Thread(target=self._run, args=(consumer,), daemon=True)
        self._thread.start()

    def _run(self, consumer: Consumer) -> None:
        try:
            while not self._stop.is_set():
                message = consumer.poll(0.05)
                if message is None or message.error() is not None:
                    continue
                arrived = time.time()
                n = orjson.loads(message.value() or b"{}").get("n")
                if n in self.times:
                    self.duplicates += 1
                else:
                    self.times[n] = arrived
                    self.produced[n] = message.timestamp()[1] / 1000
        finally:
            consumer.close()

    def wait_for(self, numbers: Any, timeout: float) -> bool:
        wanted = set(numbers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n in self.times for n in wanted):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
