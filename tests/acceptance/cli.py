"""Run the real ``outbox-relay`` command line as a subprocess, the way operators do.

Every child gets an explicit environment: the test process's own, minus any ``OUTBOX_*``
variable (so a developer's shell or the harness's ``OUTBOX_TEST_*`` settings cannot leak
in), plus exactly what the test passes.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql as psql
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

import outbox_lib

COMMAND = (sys.executable, "-m", "relay.cli")


def cli_env(values: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """``os.environ`` without ``OUTBOX_*``, then ``values`` (``None`` values are skipped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({k: v for k, v in (values or {}).items() if v is not None})
    return env


def run_cli(
    *args: str, env: Mapping[str, str | None] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``outbox-relay ARGS`` to completion; stdout and stderr are captured as text."""
    return subprocess.run(
        [*COMMAND, *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def start_cli(*args: str, env: Mapping[str, str | None] | None = None) -> subprocess.Popen[str]:
    """Start ``outbox-relay ARGS`` without waiting (for concurrency tests)."""
    return subprocess.Popen(
        [*COMMAND, *args],
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def run_on_terminal(
    *args: str,
    env: Mapping[str, str | None] | None = None,
    answer: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, str]:
    """Run ``outbox-relay ARGS`` with stdin, stdout and stderr on a pseudo-terminal, as an
    operator at a shell does; type ``answer`` once a ``[y/N]`` question shows. Returns the
    exit code and everything printed (``\r\n`` line ends made ``\n``)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*COMMAND, *args], env=cli_env(env), stdin=follower, stdout=follower, stderr=follower
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if answer is not None and b"[y/N]" in output:
                os.write(leader, answer.encode() + b"\n")
                answer = None
        code = process.wait(max(0.1, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    return code, output.decode().replace("\r\n", "\n")


def error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines."""
    return [line for line in stderr.splitlines() if line.strip()]


class RelayProcess:
    """A running ``outbox-relay run``; its output is read continuously (no pipe stalls)."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        assert popen.stdout is not None and popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(stream,), daemon=True)
            for stream in (popen.stdout, popen.stderr)
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: Iterable[str]) -> None:
        for line in stream:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything printed so far (stdout and stderr interleaved, one line each)."""
        with self._lock:
            return "\n".join(self._lines)

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """True once a line matches ``pattern`` (regex); False on timeout or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(regex.search(line) for line in self._lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._readers_alive()):
                    return False
                self._changed.wait(min(left, 0.1))
        return True

    def _readers_alive(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and return the exit code; raises if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        finally:
            self._join()
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self._join()

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start_relay(
    *args: str,
    env: Mapping[str, str | None] | None = None,
    ready_timeout: float = 20.0,
) -> RelayProcess:
    """``outbox-relay run ARGS``, returned once it logged that it started.

    Use as a context manager: a test that fails half-way still kills the process.
    """
    relay = RelayProcess(start_cli("run", *args, env=env))
    if not relay.wait_for(r"\bstarted\b", ready_timeout):
        relay.kill()
        raise AssertionError(
            f"outbox-relay run did not start within {ready_timeout} s "
            f"(exit code {relay.popen.returncode}):\n{relay.output}"
        )
    return relay


# --- database helpers ------------------------------------------------------------------


def sqlalchemy_url(database_url: str) -> str:
    """The SQLAlchemy form of a libpq URL, keeping its query (``?host=/socket/dir``)."""
    scheme, rest = database_url.split("://", 1)
    assert scheme in ("postgresql", "postgres"), database_url
    return f"postgresql+psycopg://{rest}"


def migrate(database_url: str, schema: str = "outbox") -> None:
    """Set-up step for tests about other commands: ``outbox-relay migrate`` must succeed."""
    result = run_cli("migrate", "--schema", schema, env={"OUTBOX_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr


def publish_many(database_url: str, messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """``outbox_lib.publish`` each message (kwargs: topic, payload, key, headers,
    idempotency_key) in one committed SQLAlchemy transaction; returns the ids."""
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with Session(engine) as session, session.begin():
            return [outbox_lib.publish(session, **message) for message in messages]
    finally:
        engine.dispose()


def query(database_url: str, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
    """All rows of one statement, on a short autocommit connection."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def execute(database_url: str, sql: str, params: Sequence[Any] | None = None) -> None:
    """Run one statement that returns no rows, on a short autocommit connection."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql, params)


def scalar(database_url: str, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    rows = query(database_url, sql, params)
    assert len(rows) == 1 and len(rows[0]) == 1, rows
    return rows[0][0]


def insert_dead_letter(
    database_url: str,
    *,
    route: str,
    topic: str,
    message_id: uuid.UUID | None = None,
    key: bytes | None = None,
    payload: bytes = b'{"n": 0}',
    headers: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    attempts: int = 3,
    reason: str = "max attempts reached (HTTP 503)",
    last_error: str | None = "HTTP 503: unavailable",
    last_status: str | None = "HTTP 503",
    dead_seconds_ago: float = 0.0,
    schema: str = "outbox",
) -> uuid.UUID:
    """Write a dead letter as the relay would (the way to set one up without a failing
    sink); ``dead_seconds_ago`` orders them. Returns the message id."""
    message_id = message_id or uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            psql.SQL(
                "INSERT INTO {s}.dead_letter (message_id, seq, route, topic, msg_key, payload,"
                " content_type, headers, idempotency_key, bucket, created_at, attempts, reason,"
                " last_error, last_status, dead_at)"
                " VALUES (%(id)s, nextval(pg_get_serial_sequence({t}, 'seq')), %(route)s,"
                " %(topic)s, %(key)s, %(payload)s, 'application/json', %(headers)s,"
                " %(idem)s, {s}.key_bucket(%(key)s), now() - interval '1 hour', %(attempts)s,"
                " %(reason)s, %(error)s, %(status)s, now() - make_interval(secs => %(ago)s))"
            ).format(s=psql.Identifier(schema), t=psql.Literal(f"{schema}.message")),
            {
                "id": message_id, "route": route, "topic": topic, "key": key,
                "payload": payload, "headers": Jsonb(dict(headers or {})),
                "idem": idempotency_key, "attempts": attempts, "reason": reason,
                "error": last_error, "status": last_status, "ago": dead_seconds_ago,
            },
        )  # fmt: skip
    return message_id


def insert_delivery(
    database_url: str,
    *,
    route: str,
    topic: str,
    message_id: uuid.UUID | None = None,
    key: bytes | None = None,
    payload: bytes = b'{"n": 0}',
    headers: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    delivered_seconds_ago: float = 0.0,
    schema: str = "outbox",
) -> uuid.UUID:
    """Write a delivery record as the relay would after a sink acknowledged the message (a
    batch of one, with a fresh seq, so records are in insertion order). Returns the message
    id."""
    message_id = message_id or uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            psql.SQL(
                "INSERT INTO {s}.delivery_batch (route, delivered_at, message_id, seq, topic,"
                " msg_key, payload, content_type, headers, idempotency_key, created_at,"
                " attempts, kafka_partition, kafka_offset)"
                " VALUES (%(route)s, now() - make_interval(secs => %(ago)s), ARRAY[%(id)s::uuid],"
                " ARRAY[nextval(pg_get_serial_sequence({t}, 'seq'))], ARRAY[%(topic)s::text],"
                " ARRAY[%(key)s::bytea], ARRAY[%(payload)s::bytea], ARRAY['application/json'],"
                " ARRAY[%(headers)s::jsonb], ARRAY[%(idem)s::text],"
                " ARRAY[now() - make_interval(secs => %(ago)s + 1)], ARRAY[1],"
                " ARRAY[NULL::int], ARRAY[NULL::bigint])"
            ).format(s=psql.Identifier(schema), t=psql.Literal(f"{schema}.message")),
            {
                "id": message_id, "route": route, "topic": topic, "key": key,
                "payload": payload, "headers": Jsonb(dict(headers or {})),
                "idem": idempotency_key, "ago": delivered_seconds_ago,
            },
        )  # fmt: skip
    return message_id
