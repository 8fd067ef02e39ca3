"""Run the relay for tests: in-process (a thread with its own event loop) or as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

import outbox_lib
from relay.app import run_relay
from relay.config import Settings, load_settings
from relay.engine import Engine as RelayEngine


def migrate(url: str, schema: str = "outbox") -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        outbox_lib.migrate(conn, schema)
    return url


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=f"postgresql+{driver}"))


def sa_engine(url: str) -> Engine:
    return create_engine(sqlalchemy_url(url), pool_size=4)


def publish_many(
    engine: Engine,
    topic: str,
    count: int,
    *,
    keys: int | None = None,
    per_tx: int = 100,
    rollback: Callable[[int], bool] | None = None,
    payload: Callable[[int], object] | None = None,
    payload_offset: int = 0,
) -> list[int]:
    """Publish ``count`` messages ``{"n": i}`` keyed ``k{i % keys}``, ``i`` counting from
    ``payload_offset``; return the committed ``n``s."""
    committed: list[int] = []
    end = payload_offset + count
    for start in range(payload_offset, end, per_tx):
        batch = list(range(start, min(start + per_tx, end)))
        with Session(engine) as session:
            for n in batch:
                key = None if keys is None else f"k{n % keys}"
                body = payload(n) if payload else {"n": n}
                outbox_lib.publish(session, topic, body, key=key)
            if rollback and rollback(start):
                session.rollback()
            else:
                session.commit()
                committed.extend(batch)
    return committed


def scalar(url: str, query: str, params: Mapping[str, Any] | None = None) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def settings_for(url: str, bootstrap: str | None, **overrides: Any) -> Settings:
    flags: dict[str, Any] = {"database_url": url, "kafka_bootstrap_servers": bootstrap}
    flags.setdefault("poll_interval", 0.2)
    flags.update({k: v for k, v in overrides.items() if k != "config"})
    return load_settings(flags, {}, overrides.get("config"))


class RelayThread:
    """``run_relay`` on its own event loop in a thread, stoppable from the test."""

    def __init__(self, settings: Settings, routes: Iterable[Any] | None = None) -> None:
        self.settings = settings
        self.engine: RelayEngine | None = None
        self.error: BaseException | None = None
        self._routes = routes
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._run())
        except BaseException as exc:
            self.error = exc
        finally:
            self._loop.close()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        await run_relay(self.settings, self._stop, on_start=self._started)

    def _started(self, engine: RelayEngine) -> None:
        if self._routes is not None:
            engine.routes[:] = list(self._routes)
        self.engine = engine

    def __enter__(self) -> RelayThread:
        self._thread.start()
        wait_until(lambda: self.engine is not None or self.error is not None, 20, "relay start")
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
        if self.error:
            raise self.error

    @property
    def delivered(self) -> int:
        return self.engine.stats.delivered if self.engine else 0

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the relay's event loop (e.g. set an asyncio.Event there)."""
        self._loop.call_soon_threadsafe(callback)

    def wait_delivered(self, count: int, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.delivered >= count or self.error is not None,
            timeout,
            f"{count} deliveries (have {self.delivered})",
        )
        if self.error:
            raise self.error


class RelayProcess:
    """``outbox-relay run`` as a child process, for SIGKILL/SIGTERM tests."""

    def __init__(self, url: str, bootstrap: str, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        full_env.update(
            OUTBOX_DATABASE_URL=url,
            OUTBOX_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            OUTBOX_POLL_INTERVAL="0.2",
            **env,
        )
        self._log = log_path.open("ab")
        # Several processes may append to one log: this one's lines start here.
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "run"],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_started(self, timeout: float = 20.0) -> RelayProcess:
        wait_until(
            lambda: b"started" in self._own_log() or self.proc.poll() is not None,
            timeout,
            "relay process start",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"relay exited early:\n{self._own_log().decode()}")
        return self

    def _own_log(self) -> bytes:
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            return log.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop_quietly(self) -> None:
        """Teardown after a failure: kill the process if it still runs, close the log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code
