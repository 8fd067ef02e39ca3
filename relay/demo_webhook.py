"""``outbox-relay demo``, webhook half: a local receiver for the ``billing-hook`` route, and
the checks of what it received.

The receiver is a plain :class:`~http.server.ThreadingHTTPServer` on ``127.0.0.1``, in a
process of its own, that behaves like a careful Standard Webhooks consumer: it verifies
every request's signature
(recomputing the HMAC itself, so the demo does not need the ``standardwebhooks`` package),
checks that ``webhook-id`` and ``idempotency-key`` agree, and records each arrival. To show
retries it answers ``503`` with ``Retry-After: 1`` to the first attempt of every
:data:`FAIL_EVERY`-th webhook-id (chosen by a hash, so the same ids on every run); the relay
must come back with the same ``webhook-id`` and, meanwhile, hold back that customer's later
orders.
"""

from __future__ import annotations

import base64
import contextlib
import json
import mmap
import os
import secrets
import signal
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import astuple, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import orjson

from outbox_lib.inbox import WebhookReceiver, WebhookVerificationError

from .errors import RelayError

FAIL_EVERY = 100
"""One webhook-id in this many is answered 503 on its first attempt. Not more: a 503 pauses
the whole route (for its ``Retry-After``), so each one holds up the demo by about a second."""
RETRY_AFTER_S = 1
TOLERANCE_S = 300
"""How far ``webhook-timestamp`` may be from now, as Standard Webhooks libraries allow."""
PATH = "/hooks/orders"
HOST = "127.0.0.1"
_COUNTS = struct.Struct("qq")  # webhook-ids answered 2xx, retried requests
_SHUTDOWN_POLL_S = 0.05  # how soon serve_forever() notices shutdown() (default 0.5 s)


def route_toml(name: str, topic: str, url: str, secret_env: str) -> str:
    """The ``[[routes]]`` table of a webhook route to this receiver, for a config file.

    The secret stays out of the file (``secret_env``). The receiver listens on 127.0.0.1,
    which the SSRF guard refuses without ``allow_private_network``. The short first backoff
    leaves the retry delay to the receiver's ``Retry-After``.
    """
    q = json.dumps  # a JSON string is a TOML basic string
    return f"""
[[routes]]
name = {q(name)}
topics = [{q(topic)}]
sink = "webhook"
url = {q(url)}
secret_env = {q(secret_env)}
allow_private_network = true
concurrency = 16
backoff_initial_s = 0.2
"""


def new_secret() -> str:
    """A fresh signing secret in the ``whsec_`` form the route expects."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def signature_ok(receiver: WebhookReceiver, headers: Mapping[str, str], body: bytes) -> bool:
    """Standard Webhooks v1, checked the way a receiver using :mod:`outbox_lib.inbox` would."""
    try:
        receiver.verify(headers, body)
    except WebhookVerificationError:
        return False
    return True


@dataclass(frozen=True)
class Request:
    """One request as the receiver saw it; ``index`` is its place in arrival order."""

    index: int
    webhook_id: str
    order_id: int | None
    customer: str | None
    signed: bool
    headers_ok: bool
    status: int


class Receiver:
    """The demo's webhook endpoint; ``with`` starts it on a free port and stops it. ::

        with Receiver(secret, workdir / "webhook.counts") as hook:
            ...  # a route with url=hook.url delivers to it
            hook.requests()

    It runs in a process of its own (``python -m relay.demo_webhook COUNTS``), as a real
    endpoint would: in the demo's process its request threads would compete with the relays
    and the sample app for the GIL. The secret goes over its stdin, the port and its log
    come back over its stdout, and the two counters the progress display reads live in the
    small file ``counts``, which both processes map (no pipe round trip from the relays'
    event loop).
    """

    def __init__(self, secret: str, counts: Path) -> None:
        self._secret = secret
        self._path = counts
        self._counts: mmap.mmap | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        """The endpoint's URL; waits for the receiver to listen."""
        return f"http://{HOST}:{self._listening()}{PATH}"

    @property
    def delivered(self) -> int:
        """Distinct webhook-ids answered 2xx so far."""
        return self._count(0)

    @property
    def retried(self) -> int:
        """Requests repeating a webhook-id seen before."""
        return self._count(1)

    def _count(self, which: int) -> int:
        return int(_COUNTS.unpack_from(self._counts)[which]) if self._counts else 0

    def requests(self) -> list[Request]:
        """Every request so far, in arrival order."""
        self._listening()  # the port comes first on the pipe
        self._write("report")
        return [Request(*row) for row in self._read()]

    def _listening(self) -> int:
        if self._port is None:
            self._port = int(self._read())
        return self._port

    def _write(self, line: str) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(line.encode() + b"\n")
            self._process.stdin.flush()
        except OSError as exc:
            raise RelayError(f"the webhook receiver stopped ({exc.strerror})") from exc

    def _read(self) -> Any:
        assert self._process is not None and self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            raise RelayError(f"the webhook receiver stopped (exit status {code})")
        return orjson.loads(line)

    def __enter__(self) -> Self:
        self._path.write_bytes(bytes(_COUNTS.size))
        with self._path.open("r+b") as shared:
            self._counts = mmap.mmap(shared.fileno(), _COUNTS.size)
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(self._path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_child_env(),
            start_new_session=True,  # Ctrl-C goes to the demo, which stops the receiver
        )
        try:
            self._write(self._secret)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self._process
        if process is not None:
            with contextlib.suppress(OSError):
                assert process.stdin is not None
                process.stdin.close()  # end of input: the receiver stops
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()
        if self._counts is not None:
            self._counts.close()


def _child_env() -> dict[str, str]:
    """The demo's environment, with this ``relay`` package first on the import path."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def main() -> None:
    """The receiver process (see :class:`Receiver`): serve until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the demo stops it by closing stdin
    secret = sys.stdin.readline().strip()
    with (
        open(sys.argv[1], "r+b") as shared,
        mmap.mmap(shared.fileno(), _COUNTS.size) as counts,
    ):
        log = _Log(secret, counts)
        server = _Server(log)
        serve = threading.Thread(target=server.serve_forever, args=(_SHUTDOWN_POLL_S,))
        serve.start()
        try:
            _reply(server.server_address[1])
            for line in sys.stdin:
                if line.strip() == "report":
                    _reply([astuple(request) for request in log.requests()])
        finally:
            server.shutdown()
            server.server_close()


def _reply(value: object) -> None:
    sys.stdout.buffer.write(orjson.dumps(value) + b"\n")
    sys.stdout.buffer.flush()


class _Log:
    """What the receiver decides and records, shared by its request threads."""

    def __init__(self, secret: str, counts: mmap.mmap) -> None:
        self._receiver = WebhookReceiver(secret, tolerance_s=TOLERANCE_S)
        self._counts = counts
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._seen: set[str] = set()
        self._answered: set[str] = set()

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def answer(self, headers: Mapping[str, str], body: bytes) -> int:
        """Check and record one request; the status to answer it with."""
        webhook_id = headers.get("webhook-id") or ""
        order_id, customer = _order(body)
        signed = signature_ok(self._receiver, headers, body)
        headers_ok = _headers_ok(headers, webhook_id, order_id)
        with self._lock:
            first = webhook_id not in self._seen
            self._seen.add(webhook_id)
            status = _status(webhook_id, first=first, signed=signed, headers_ok=headers_ok)
            if status < 300:
                self._answered.add(webhook_id)
            index = len(self._requests)
            self._requests.append(
                Request(index, webhook_id, order_id, customer, signed, headers_ok, status)
            )
            retried = len(self._requests) - len(self._seen)
            _COUNTS.pack_into(self._counts, 0, len(self._answered), retried)
        return status


def _headers_ok(headers: Mapping[str, str], webhook_id: str, order_id: int | None) -> bool:
    """``webhook-id`` is the message's idempotency key (the app's ``order-N-created``), and
    so is ``idempotency-key``; the body is JSON."""
    content_type = headers.get("content-type") or ""
    return headers.get(
        "idempotency-key"
    ) == webhook_id == f"order-{order_id}-created" and content_type.startswith("application/json")


def _status(webhook_id: str, *, first: bool, signed: bool, headers_ok: bool) -> int:
    if not signed:
        return 401
    if not headers_ok:
        return 400
    if first and zlib.crc32(webhook_id.encode()) % FAIL_EVERY == 0:
        return 503
    return 204


def _order(body: bytes) -> tuple[int | None, str | None]:
    try:
        order = orjson.loads(body)
        return int(order["order_id"]), str(order["customer"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None, None


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a relay's keep-alive connection must not hold up shutdown

    def __init__(self, log: _Log) -> None:
        super().__init__((HOST, 0), _Handler)
        self.log = log


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the relay reuses its pooled connections
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {name.lower(): value for name, value in self.headers.items()}
        status = cast(_Server, self.server).log.answer(headers, body)
        self.send_response(status)
        if status == 503:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the progress display and the summary report what arrived."""


# --- checking -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookReport:
    """What the receiver got, compared with what the sample app committed."""

    route: str
    url: str
    requests: int
    throttled: int
    retried: int
    delivered: int
    missing: int
    bad_signatures: int
    bad_headers: int
    unexpected: int
    out_of_order: int

    @property
    def ok(self) -> bool:
        return self.delivered > 0 and not (
            self.missing
            or self.bad_signatures
            or self.bad_headers
            or self.unexpected
            or self.out_of_order
        )

    def rows(self) -> list[tuple[str, str]]:
        """The summary's rows for this route."""
        return [
            ("  requests received", f"{self.requests}"),
            (f"  answered 503 (Retry-After: {RETRY_AFTER_S})", f"{self.throttled}"),
            ("  retried requests (same id)", f"{self.retried}"),
            ("  orders delivered (2xx)", f"{self.delivered}"),
            ("  orders missing", f"{self.missing}"),
            ("  bad signatures", f"{self.bad_signatures}"),
            ("  id/header mismatches", f"{self.bad_headers}"),
            ("  rolled back but received", f"{self.unexpected}"),
            ("  per-customer order violations", f"{self.out_of_order}"),
        ]


def check_webhooks(
    route: str, url: str, requests: list[Request], committed: Collection[int]
) -> WebhookReport:
    """Every committed order answered 2xx, no rolled-back one received, every request
    signed, and per customer the first successful arrivals in commit order."""
    seen = Counter(r.webhook_id for r in requests)
    delivered = {r.order_id for r in requests if r.status < 300}
    return WebhookReport(
        route=route,
        url=url,
        requests=len(requests),
        throttled=sum(1 for r in requests if r.status == 503),
        retried=sum(n - 1 for n in seen.values()),
        delivered=len(delivered & set(committed)),
        missing=len(set(committed) - delivered),
        bad_signatures=sum(1 for r in requests if not r.signed),
        bad_headers=sum(1 for r in requests if not r.headers_ok),
        unexpected=sum(1 for r in requests if r.order_id not in committed),
        out_of_order=_order_violations(requests),
    )


def _order_violations(requests: Iterable[Request]) -> int:
    """Per customer, the first 2xx-answered arrival of each webhook-id, in arrival order:
    each order id must be above the last (the single writer commits in id order)."""
    first: dict[str, Request] = {}
    for request in sorted(requests, key=lambda r: r.index):
        if request.status < 300:
            first.setdefault(request.webhook_id, request)
    streams: dict[str | None, list[int]] = defaultdict(list)
    for request in first.values():  # dicts keep insertion order: arrival order
        if request.order_id is not None:
            streams[request.customer].append(request.order_id)
    violations = 0
    for order_ids in streams.values():
        last = 0
        for order_id in order_ids:
            if order_id < last:
                violations += 1
            last = max(last, order_id)
    return violations


if __name__ == "__main__":
    main()
