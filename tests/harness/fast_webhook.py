"""A minimal, fast webhook receiver for throughput benchmarks, meant for its own process.

An asyncio ``Protocol`` speaking just enough HTTP/1.1 (request line, headers,
``Content-Length`` body, keep-alive) to answer every request with an empty ``--status``
(200) response, counting requests and distinct ``webhook-id`` values. Per-request work is a
few ``bytes.find`` calls, so even a 2-core machine answers well over 10k requests/s
(~29k measured, 8 connections, pipelined); signatures are not checked unless ``--secret``
is given, and then only on 1 request in 1000.

``GET /stats`` answers JSON ``{"requests", "ids", "first_at", "last_at", "verified",
"verify_failures"}`` (times are ``time.time()`` at arrival; ``/stats`` itself is not
counted); ``POST /stats/reset`` zeroes it. ``--delay`` answers each request that many
seconds later without blocking other connections (the slow endpoint of the isolation
benchmark)::

    python -m tests.harness.fast_webhook --port 8089 [--delay 1] [--status 503] [--secret whsec_..]

From Python, :class:`FastWebhookProcess` runs it as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.harness.ports import free_port, port_accepts

HOST = "127.0.0.1"
VERIFY_EVERY = 1000
MAX_HEAD = 65536
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Options:
    port: int
    host: str = HOST
    delay: float = 0.0
    status: int = 200
    secret: str | None = None


@dataclass(frozen=True)
class FastStats:
    """What ``GET /stats`` reports."""

    requests: int
    ids: int
    first_at: float | None
    last_at: float | None
    verified: int = 0
    verify_failures: int = 0


class _Counters:
    __slots__ = ("first_at", "ids", "last_at", "requests", "verified", "verify_failures")

    def __init__(self) -> None:
        self.requests = 0
        self.ids: set[bytes] = set()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.verified = 0
        self.verify_failures = 0

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "ids": len(self.ids),
                "first_at": self.first_at,
                "last_at": self.last_at,
                "verified": self.verified,
                "verify_failures": self.verify_failures,
            }
        ).encode()


def _response(status: int, body: bytes = b"", content_type: bytes = b"") -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Status"
    head = b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n" % (status, reason, len(body))
    if content_type:
        head += b"content-type: " + content_type + b"\r\n"
    return head + b"\r\n" + body


class _App:
    """State shared by every connection of one server."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.counters = _Counters()
        self.answer = _response(options.status)
        self.verifier: Any = None
        if options.secret:
            from standardwebhooks import Webhook  # only when asked: keeps start-up fast

            self.verifier = Webhook(options.secret)

    def handle(
        self, method: bytes, target: bytes, head: bytes, lowered: bytes, body: bytes
    ) -> bytes | None:
        """The response to send now, or None for one to send after the delay."""
        if target.startswith(b"/stats"):
            return self._stats(method, target)
        counters = self.counters
        counters.requests += 1
        now = time.time()
        if counters.first_at is None:
            counters.first_at = now
        counters.last_at = now
        webhook_id = _header(head, lowered, b"\r\nwebhook-id:")
        if webhook_id is not None:
            counters.ids.add(webhook_id)
        if self.verifier is not None and counters.requests % VERIFY_EVERY == 1:
            self._verify(head, body)
        return None if self.options.delay > 0 else self.answer

    def _stats(self, method: bytes, target: bytes) -> bytes:
        if method == b"POST" and target.startswith(b"/stats/reset"):
            self.counters = _Counters()
        return _response(200, self.counters.as_json(), b"application/json")

    def _verify(self, head: bytes, body: bytes) -> None:
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        try:
            self.verifier.verify(body, headers, json_parse=False)
        except Exception:
            self.counters.verify_failures += 1
        else:
            self.counters.verified += 1


def _header(head: bytes, lowered: bytes, marker: bytes) -> bytes | None:
    """Value of the header ``marker`` (``b"\\r\\n<lower-case name>:"``), None if absent;
    ``lowered`` is ``head.lower()``, computed once per request by the caller."""
    start = lowered.find(marker)
    if start < 0:
        return None
    end = head.find(b"\r\n", start + 2)
    return head[start + len(marker) : end if end >= 0 else len(head)].strip()


class _Connection(asyncio.Protocol):
    def __init__(self, app: _App) -> None:
        self.app = app
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        # Delayed answers, in request order: (due, response, close after).
        self.pending: deque[tuple[float, bytes, bool]] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and self._one_request():
            pass

    def _one_request(self) -> bool:
        """Parse and answer one complete request from the buffer; False if incomplete."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._send(_response(431), close=True)
            return False
        head = bytes(self.buffer[:end])
        lowered = head.lower()
        try:
            length = int(_header(head, lowered, b"\r\ncontent-length:") or 0)
        except ValueError:
            self._send(_response(400), close=True)
            return False
        if len(self.buffer) < end + 4 + length:
            return False
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0]
        close = b"\r\nconnection: close" in lowered
        answer = self.app.handle(method, target, head, lowered, body)
        if answer is None:
            self._later(close)
        else:
            self._send(answer, close)
        return True

    def _send(self, response: bytes, close: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(response)
        if close:
            self.transport.close()
            self.transport = None

    def _later(self, close: bool) -> None:
        loop = asyncio.get_running_loop()
        self.pending.append((loop.time() + self.app.options.delay, self.app.answer, close))
        if self.timer is None:
            self.timer = loop.call_at(self.pending[0][0], self._flush)

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = None
        while self.pending and self.pending[0][0] <= loop.time():
            _, response, close = self.pending.popleft()
            self._send(response, close)
        if self.pending and self.transport is not None:
            self.timer = loop.call_at(self.pending[0][0], self._flush)


async def serve(options: Options) -> asyncio.Server:
    """Start the server on the running loop (for in-process use); caller closes it."""
    app = _App(options)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Connection(app), options.host, options.port, backlog=1024, reuse_address=True
    )


async def _serve_until_signalled(options: Options) -> None:
    server = await serve(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.fast_webhook")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--secret", help="whsec_...: verify 1 request in 1000")
    args = parser.parse_args(argv)
    return Options(args.port, args.host, args.delay, args.status, args.secret)


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(_serve_until_signalled(parse_args(argv)))


class FastWebhookProcess:
    """The fast receiver as a child process, for benchmarks and tests.

    Example::

        with FastWebhookProcess(delay=1.0) as slow:
            ...  # point a route at slow.url()
            print(slow.stats().requests)
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        status: int = 200,
        secret: str | None = None,
        port: int | None = None,
    ) -> None:
        self.delay, self.status, self.secret = delay, status, secret
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 10.0, attempts: int = 3) -> FastWebhookProcess:
        """Spawn and wait until it accepts connections (a new port if one was taken)."""
        output = ""
        for _ in range(attempts):
            port = self.port or free_port(HOST)
            self._spawn(port)
            if self._accepting(port, timeout):
                self.port = port
                return self
            output = self._stop_and_read()
        raise RuntimeError(f"fast webhook server did not start:\n{output}")

    def _accepting(self, port: int, timeout: float) -> bool:
        """Poll (a child process cannot signal us more cheaply); False if it died."""
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None:
            if port_accepts(HOST, port):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return False

    def _spawn(self, port: int) -> None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by _stop_and_read
        argv = [sys.executable, "-m", "tests.harness.fast_webhook", "--port", str(port)]
        argv += ["--delay", str(self.delay), "--status", str(self.status)]
        if self.secret:
            argv += ["--secret", self.secret]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def url(self, path: str = "/hook") -> str:
        return f"http://{HOST}:{self.port}{path}"

    def stats(self, timeout: float = 5.0) -> FastStats:
        return FastStats(**json.loads(self._call("GET", "/stats", timeout)))

    def reset(self, timeout: float = 5.0) -> None:
        """Zero the counters (e.g. after a warm-up)."""
        self._call("POST", "/stats/reset", timeout)

    def _call(self, method: str, path: str, timeout: float) -> bytes:
        # http.client rather than urllib: no proxy settings from the environment apply.
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}")
        return body

    def stop(self, timeout: float = 10.0) -> str:
        """Terminate (SIGTERM, then SIGKILL) and return what the process printed."""
        return self._stop_and_read(timeout)

    def _stop_and_read(self, timeout: float = 10.0) -> str:
        proc, log = self.proc, self._log
        self.proc = self._log = None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if log is None:
            return ""
        with log:
            log.seek(0)
            return log.read().decode(errors="replace")

    def __enter__(self) -> FastWebhookProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
