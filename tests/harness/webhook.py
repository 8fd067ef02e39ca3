"""A real HTTP/1.1 webhook receiver for tests: records, verifies and answers as scripted.

:class:`WebhookServer` is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 (keep-alive, one
daemon thread per connection). Every request is recorded as a :class:`RecordedRequest`
with its Standard Webhooks signature checked, by the ``standardwebhooks`` package, against
each configured secret separately, and its ``outbox-topic-signature`` (the topic header,
a line feed, then what ``webhook-signature`` signs) by this module's own HMAC. What it
answers comes, in order of precedence, from

1. ``server.responder`` -- a callable ``RecordedRequest -> Reply | int``, for full control;
2. ``server.script(path, replies)`` -- queued replies consumed in order, per path
   (``None`` = any path; a path's own queue is used first);
3. ``server.default`` -- ``Reply()`` (200, empty body) unless changed.

Example::

    with WebhookServer(secret) as server:
        server.script("/hook", [503, Reply(429, headers={"Retry-After": "1"})])
        ...  # run the relay against server.url("/hook")
        assert server.wait_for(3, timeout=10)
        assert all(r.ok for r in server.requests)

Errors inside the server (a responder that raises, a handler bug) are answered with 500
and collected in ``server.errors``; leaving the ``with`` block raises if there are any, so
a broken responder cannot pass for a relay bug. Clients that hang up are not errors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets as _secrets
import select
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

from tests.harness.ports import free_port

__all__ = [
    "RecordedRequest",
    "Reply",
    "Responder",
    "WebhookServer",
    "fail_first",
    "free_port",
    "new_secret",
    "refused_url",
    "sign",
    "signed_headers",
]

HOST = "127.0.0.1"
SECRET_PREFIX = "whsec_"
# Long enough for any test; bounds threads left on idle keep-alive connections.
IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Reply:
    """One scripted answer. ``delay`` sleeps before answering (a client that hangs up
    meanwhile is noted, not answered); ``close_connection`` answers nothing and resets
    the TCP connection instead."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    close_connection: bool = False


@dataclass
class RecordedRequest:
    """One request as received. ``verified[i]`` / ``verify_errors[i]`` are the outcome
    for the server's ``i``-th secret (error text ``None`` where it verified).

    ``reply_status`` is the status chosen (``None`` for a connection reset);
    ``replied_at`` is set once the answer is written; ``client_gone`` is True if the
    client hung up before that (e.g. its timeout fired during ``Reply.delay``).
    """

    method: str
    path: str
    target: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    verified: tuple[bool, ...]
    verify_errors: tuple[str | None, ...]
    signatures: tuple[tuple[str, str], ...]
    connection: int
    reply_status: int | None = None
    replied_at: float | None = None
    client_gone: bool = False

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def webhook_timestamp(self) -> int | None:
        value = self.headers.get("webhook-timestamp")
        return int(value) if value and value.isdigit() else None

    @property
    def ok(self) -> bool:
        """Signed, and every configured secret verified it."""
        return bool(self.verified) and all(self.verified)

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[RecordedRequest], Reply | int]


def as_reply(reply: Reply | int) -> Reply:
    return reply if isinstance(reply, Reply) else Reply(status=reply)


# -- signing, for tests that play the sender -------------------------------------------


def new_secret(nbytes: int = 24) -> str:
    """A fresh Standard Webhooks secret, ``whsec_<base64>``."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode()


def sign(
    secret: str, webhook_id: str, timestamp: int, body: bytes, topic: str | None = None
) -> str:
    """One ``v1,<base64>`` signature entry: HMAC-SHA256 of ``{id}.{ts}.{body}``, or with
    ``topic`` (the ``outbox-topic`` header value) of ``{topic}\n{id}.{ts}.{body}``."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    key = base64.b64decode(encoded + "=" * (-len(encoded) % 4))
    content = f"{webhook_id}.{timestamp}.".encode() + body
    if topic is not None:
        content = f"{topic}\n".encode() + content
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def signed_headers(
    secrets: Sequence[str], webhook_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers, signed once per secret."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(sign(s, webhook_id, ts, body) for s in secrets),
    }


def refused_url(path: str = "/hook") -> str:
    """A URL on a port nothing listens on (free a moment ago), for connection-refused tests."""
    return f"http://{HOST}:{free_port(HOST)}{path}"


def fail_first(
    attempts: int,
    failure: Reply | int = 500,
    *,
    then: Reply | int = 200,
    ids: Collection[str] | None = None,
) -> Responder:
    """Responder: the first ``attempts`` deliveries of each webhook id (of ``ids`` only,
    if given) get ``failure``, every later one ``then``."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def respond(request: RecordedRequest) -> Reply:
        webhook_id = request.webhook_id or ""
        if ids is not None and webhook_id not in ids:
            return as_reply(then)
        with lock:
            seen[webhook_id] += 1
            attempt = seen[webhook_id]
        return as_reply(failure if attempt <= attempts else then)

    return respond


# -- the server --------------------------------------------------------------------------


class WebhookServer:
    """Records, verifies and answers webhook deliveries; see the module docstring.

    ``start()`` binds a free port (or ``port``); after ``stop()`` it may be started again
    on the same port, to simulate an endpoint that goes away and comes back.
    """

    def __init__(self, *secrets: str, port: int | None = None) -> None:
        self.secrets: tuple[str, ...] = secrets
        self._verifiers = tuple(Webhook(s) for s in secrets)
        self.default = Reply()
        self.responder: Responder | None = None
        self._port = port
        self._cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._scripts: dict[str | None, deque[Reply]] = {}
        self._errors: list[str] = []
        self._in_flight = 0
        self._max_concurrent = 0
        self._connections: dict[int, socket.socket] = {}
        self._connection_count = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> WebhookServer:
        if self._httpd is not None:
            raise RuntimeError("webhook server already running")
        httpd = _HTTPServer((HOST, self._port or 0), self)
        self._port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(0.05,), name=f"webhook-{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut open (keep-alive) connections, wait for their threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        with self._cond:
            for sock in self._connections.values():
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._cond.wait_for(lambda: not self._connections, timeout)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.stop()
        if exc_type is None and self.errors:
            raise AssertionError("webhook server errors:\n" + "\n".join(self.errors))

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("webhook server not started")
        return self._port

    def url(self, path: str = "/hook") -> str:
        return f"http://{HOST}:{self.port}{path}"

    # scripting

    def script(self, path: str | None, replies: Iterable[Reply | int]) -> None:
        """Queue replies for ``path`` (``None``: any path), consumed one per request."""
        with self._cond:
            self._scripts.setdefault(path, deque()).extend(as_reply(r) for r in replies)

    # observations

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot, in arrival order."""
        with self._cond:
            return list(self._requests)

    def requests_for(self, webhook_id: str) -> list[RecordedRequest]:
        """Every delivery attempt of one webhook id, in arrival order."""
        return [r for r in self.requests if r.webhook_id == webhook_id]

    def webhook_ids(self, *, distinct: bool = False) -> list[str]:
        """Webhook ids in arrival order: one per request, or (``distinct``) per first
        arrival."""
        ids = [r.webhook_id for r in self.requests if r.webhook_id is not None]
        return list(dict.fromkeys(ids)) if distinct else ids

    def wait_for(
        self, until: int | Callable[[list[RecordedRequest]], bool], timeout: float = 10.0
    ) -> bool:
        """Block until ``until`` requests arrived (or ``until(requests)`` holds; it is
        re-checked on every arrival and reply); False on timeout."""
        check = until if callable(until) else (lambda reqs: len(reqs) >= until)
        with self._cond:
            return self._cond.wait_for(lambda: check(list(self._requests)), timeout)

    def clear(self) -> None:
        """Forget recorded requests and errors; restart ``max_concurrent`` from now.
        Scripts and the responder stay."""
        with self._cond:
            self._requests.clear()
            self._errors.clear()
            self._max_concurrent = self._in_flight

    @property
    def max_concurrent(self) -> int:
        """Most requests handled at the same moment (arrival to answer) since ``clear()``."""
        with self._cond:
            return self._max_concurrent

    @property
    def errors(self) -> list[str]:
        with self._cond:
            return list(self._errors)

    # called from handler threads

    @contextmanager
    def _handling(self) -> Iterator[None]:
        with self._cond:
            self._in_flight += 1
            self._max_concurrent = max(self._max_concurrent, self._in_flight)
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1

    def _connected(self, sock: socket.socket) -> int:
        with self._cond:
            self._connection_count += 1
            self._connections[self._connection_count] = sock
            return self._connection_count

    def _disconnected(self, number: int) -> None:
        with self._cond:
            self._connections.pop(number, None)
            self._cond.notify_all()

    def _verify(self, body: bytes, headers: dict[str, str]) -> tuple[list[bool], list[str | None]]:
        verified: list[bool] = []
        errors: list[str | None] = []
        for secret, verifier in zip(self.secrets, self._verifiers, strict=True):
            try:
                verifier.verify(body, headers, json_parse=False)
            except Exception as exc:  # the package raises several kinds on bad input
                verified.append(False)
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            topic_error = _topic_signature_error(secret, body, headers)
            verified.append(topic_error is None)
            errors.append(topic_error)
        return verified, errors

    def _record(self, request: RecordedRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def _update(self, request: RecordedRequest, **changes: Any) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(request, name, value)
            self._cond.notify_all()

    def _choose(self, request: RecordedRequest) -> Reply:
        responder = self.responder
        if responder is not None:
            try:
                return as_reply(responder(request))
            except Exception:
                self._error(f"responder failed:\n{traceback.format_exc()}")
                return Reply(500, body=b"webhook harness: responder failed")
        with self._cond:
            for key in (request.path, None):
                queue = self._scripts.get(key)
                if queue:
                    return queue.popleft()
        return self.default

    def _error(self, text: str) -> None:
        with self._cond:
            self._errors.append(text)


def _topic_signature_error(secret: str, body: bytes, headers: dict[str, str]) -> str | None:
    """Why ``outbox-topic-signature`` does not sign ``outbox-topic`` with ``secret``, or None."""
    lowered = {name.lower(): value for name, value in headers.items()}
    topic = lowered.get("outbox-topic")
    if not topic:
        return "no outbox-topic header"
    webhook_id, timestamp = lowered["webhook-id"], int(lowered["webhook-timestamp"])
    expected = sign(secret, webhook_id, timestamp, body, topic)
    offered = lowered.get("outbox-topic-signature", "").split()
    if not any(hmac.compare_digest(expected, entry) for entry in offered):
        return "no outbox-topic-signature matches"
    return None


def parse_signatures(header: str) -> tuple[tuple[str, str], ...]:
    """``"v1,abc v1,def"`` -> ``(("v1", "abc"), ("v1", "def"))``."""
    return tuple((v, sig) for v, _, sig in (e.partition(",") for e in header.split()))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], harness: WebhookServer) -> None:
        self.harness = harness
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on bad DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            self.harness._error(f"handler failed:\n{traceback.format_exc()}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self._number = self.server.harness._connected(self.connection)

    def finish(self) -> None:
        try:
            with suppress(OSError):
                super().finish()
        finally:
            self.server.harness._disconnected(self._number)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the recorded requests are the log."""

    def _handle(self) -> None:
        harness = self.server.harness
        with harness._handling():
            try:
                body = self._read_body()
            except ValueError as exc:
                self.send_error(400, str(exc))
                return
            request = self._recorded(body)
            harness._record(request)
            reply = harness._choose(request)
            harness._update(request, reply_status=None if reply.close_connection else reply.status)
            self._answer(request, reply)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET = do_HEAD = do_OPTIONS = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise ConnectionAbortedError("client hung up mid-body")
        return body

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while size := int(self._line().split(b";")[0].strip(), 16):
            parts.append(self.rfile.read(size))
            self._line()
        while self._line().strip():  # trailers
            pass
        return b"".join(parts)

    def _line(self) -> bytes:
        line = self.rfile.readline(65537)
        if not line:
            raise ConnectionAbortedError("client hung up mid-body")
        return line

    def _recorded(self, body: bytes) -> RecordedRequest:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        verified, errors = self.server.harness._verify(body, headers)
        return RecordedRequest(
            method=self.command,
            path=self.path.partition("?")[0],
            target=self.path,
            headers=headers,
            body=body,
            received_at=time.time(),
            verified=tuple(verified),
            verify_errors=tuple(errors),
            signatures=parse_signatures(headers.get("webhook-signature", "")),
            connection=self._number,
        )

    def _answer(self, request: RecordedRequest, reply: Reply) -> None:
        harness = self.server.harness
        if reply.delay > 0 and self._hung_up_within(reply.delay):
            self.close_connection = True
            harness._update(request, client_gone=True)
            return
        if reply.close_connection:
            self._reset()
            return
        try:
            self._write(reply)
        except OSError:
            self.close_connection = True
            harness._update(request, client_gone=True)
            return
        harness._update(request, replied_at=time.time())

    def _write(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if not any(name.lower() == "content-length" for name in reply.headers):
            self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _hung_up_within(self, delay: float) -> bool:
        """Wait ``delay`` seconds, returning early (True) if the client closes meanwhile."""
        deadline = time.monotonic() + delay
        readable, _, _ = select.select([self.connection], [], [], delay)
        if not readable:
            return False
        try:
            peeked = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        if peeked:  # a pipelined request, not a hang-up: wait out the rest
            time.sleep(max(0.0, deadline - time.monotonic()))
            return False
        return True

    def _reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), answering nothing.

        ``close()`` only marks the socket: the fd (and so the RST) goes when ``finish()``
        closes the buffered reader, before socketserver would send a polite FIN.
        """
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
