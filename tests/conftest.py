"""Session and per-test fixtures shared by every test suite.

The heavy lifting lives in :mod:`tests.harness` so that it can be imported and
reused outside fixtures; this module only wires lifetimes (session vs. test).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.harness import ports
from tests.harness.kafka import (
    ENV_BOOTSTRAP,
    ExternalKafka,
    KafkaEndpoint,
    TansuBroker,
    start_tansu,
    topic_name_for,
)
from tests.harness.postgres import PgServer, fresh_database, running_pg_server

# Property-based tests: no per-example deadline (the machine may be loaded); under CI the
# same examples every run, so a red CI names a change, not a lucky draw. Locally each run
# draws new ones, and hypothesis keeps any failure it found in .hypothesis/ to replay.
settings.register_profile("local", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "local")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server per session: starting one costs ~1 s, a database ~20 ms."""
    with running_pg_server() as server:
        yield server


@pytest.fixture
def database_url(pg_server: PgServer) -> Iterator[str]:
    """URL of a brand-new empty database, dropped (WITH FORCE) after the test."""
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaEndpoint]:
    """Shared broker; tests isolate themselves by topic name (see ``topic_name``)."""
    bootstrap = os.environ.get(ENV_BOOTSTRAP)
    if bootstrap:
        yield ExternalKafka(bootstrap)
        return
    broker = start_tansu(log_dir=tmp_path_factory.mktemp("tansu-session"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A private broker this test may pause/resume without disturbing any other test."""
    if os.environ.get(ENV_BOOTSTRAP):
        pytest.skip(f"{ENV_BOOTSTRAP} is set: no private broker to pause")
    broker = start_tansu(log_dir=tmp_path_factory.mktemp("tansu"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """Unique, Kafka-legal topic named after the test, e.g. ``t.test_x.a1b2c3``."""
    return topic_name_for(request.node.name)


@pytest.fixture
def tmp_config(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tmp_config(toml_text, name="relay.toml")`` writes the text verbatim
    (no validation, so tests can feed the CLI broken TOML) and returns the path."""

    def write(text: str, name: str = "relay.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def free_port() -> int:
    """A currently-free localhost TCP port (e.g. for the relay's metrics endpoint)."""
    return ports.free_port()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Spans recorded in memory, for tracing tests (opentelemetry-sdk is a dev dependency)."""
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A tracer provider of the test's own (the global one can be set only once)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()
