"""Proof that the webhook receivers behave as the webhook-sink tests rely on.

Real sockets and a real httpx client throughout; requests are signed here by hand so the
server's verification (the ``standardwebhooks`` package) is checked against an
independent signer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest
from standardwebhooks import Webhook

from tests.harness.fast_webhook import FastWebhookProcess
from tests.harness.webhook import (
    RecordedRequest,
    Reply,
    WebhookServer,
    fail_first,
    new_secret,
    refused_url,
    sign,
    signed_headers,
)

pytestmark = pytest.mark.integration

BODY = b'{"n": 1}'


def _own_signature(
    secret: str, webhook_id: str, timestamp: int, body: bytes, prefix: bytes = b""
) -> str:
    """Standard Webhooks v1, written out: HMAC-SHA256 over ``{id}.{ts}.{body}``; with
    ``prefix`` (``{outbox-topic}\n``), the relay's outbox-topic-signature."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, prefix + f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def _headers(
    secrets: Sequence[str], webhook_id: str = "msg_1", body: bytes = BODY
) -> dict[str, str]:
    ts = int(time.time())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(_own_signature(s, webhook_id, ts, body) for s in secrets),
        "outbox-topic": "orders.created",
        "outbox-topic-signature": " ".join(
            _own_signature(s, webhook_id, ts, body, b"orders.created\n") for s in secrets
        ),
        "content-type": "application/json",
    }


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        yield client


@pytest.fixture
def secret() -> str:
    return new_secret()


# -- recording and verification --------------------------------------------------------


def test_signed_request_is_recorded_and_verified(secret: str, client: httpx.Client) -> None:
    headers = _headers([secret])
    with WebhookServer(secret) as server:
        response = client.post(server.url("/hook?x=1"), content=BODY, headers=headers)

    assert response.status_code == 200 and response.http_version == "HTTP/1.1"
    [request] = server.requests
    assert (request.method, request.path, request.target) == ("POST", "/hook", "/hook?x=1")
    assert request.body == BODY and request.json() == {"n": 1}
    assert request.headers["content-type"] == "application/json"
    assert request.webhook_id == "msg_1"
    assert request.webhook_timestamp == int(headers["webhook-timestamp"])
    assert request.verified == (True,) and request.verify_errors == (None,) and request.ok
    assert request.signatures == (("v1", headers["webhook-signature"][3:]),)
    assert request.reply_status == 200 and not request.client_gone
    assert request.replied_at is not None and request.replied_at >= request.received_at


def test_harness_signer_matches_the_reference_implementation(secret: str) -> None:
    ts = int(time.time())
    reference = Webhook(secret).sign("msg_1", datetime.fromtimestamp(ts, tz=UTC), BODY.decode())
    assert sign(secret, "msg_1", ts, BODY) == _own_signature(secret, "msg_1", ts, BODY)
    assert sign(secret, "msg_1", ts, BODY) == reference
    headers = signed_headers([secret, new_secret()], "msg_1", BODY, timestamp=ts)
    assert headers["webhook-signature"].split(" ")[0] == reference


def test_wrong_secret_fails_verification(secret: str, client: httpx.Client) -> None:
    with WebhookServer(secret) as server:
        client.post(server.url(), content=BODY, headers=_headers([new_secret()]))

    [request] = server.requests
    assert request.verified == (False,) and not request.ok
    assert (request.verify_errors[0] or "").startswith("WebhookVerificationError")
    assert request.reply_status == 200, "verification is recorded, never enforced"


def test_each_secret_is_verified_separately(client: httpx.Client) -> None:
    old, new = new_secret(), new_secret()
    with WebhookServer(old, new) as server:
        client.post(server.url(), content=BODY, headers=_headers([old, new], "both"))
        client.post(server.url(), content=BODY, headers=_headers([new], "new-only"))

    both, new_only = server.requests
    assert both.verified == (True, True) and len(both.signatures) == 2
    assert new_only.verified == (False, True) and len(new_only.signatures) == 1
    assert server.secrets == (old, new)


def test_the_topic_signature_is_verified_too(secret: str, client: httpx.Client) -> None:
    good = _headers([secret])
    with WebhookServer(secret) as server:
        client.post(server.url(), content=BODY, headers={**good, "outbox-topic": "orders.paid"})
        client.post(server.url(), content=BODY, headers={**good, "outbox-topic": ""})
    other_topic, no_topic = server.requests
    assert (other_topic.verified, other_topic.verify_errors) == (
        (False,),
        ("no outbox-topic-signature matches",),
    )
    assert (no_topic.verified, no_topic.verify_errors) == ((False,), ("no outbox-topic header",))


def test_unsigned_requests_and_secretless_servers(secret: str, client: httpx.Client) -> None:
    with WebhookServer(secret) as signed, WebhookServer() as open_:
        client.post(signed.url(), content=b"not json")
        client.post(open_.url(), content=BODY, headers=_headers([secret]))

    [unsigned] = signed.requests
    assert unsigned.verified == (False,) and unsigned.signatures == ()
    assert (unsigned.verify_errors[0] or "").startswith("WebhookVerificationError")
    [unchecked] = open_.requests
    assert unchecked.verified == () and unchecked.verify_errors == () and not unchecked.ok


def test_binary_bodies_are_verified_over_their_bytes(secret: str, client: httpx.Client) -> None:
    """The harness verifies the raw bytes received, so a correctly signed body that is not
    UTF-8 passes and the same body with one byte changed does not."""
    body = b"\xff\x00binary"
    with WebhookServer(secret) as server:
        client.post(server.url(), content=body, headers=_headers([secret], body=body))
        client.post(server.url(), content=body[:-1] + b"?", headers=_headers([secret], body=body))
    signed, tampered = server.requests
    assert (signed.body, signed.verified, signed.verify_errors) == (body, (True,), (None,))
    assert tampered.verified == (False,)


def test_repeated_headers_are_joined(client: httpx.Client) -> None:
    with WebhookServer() as server:
        client.post(server.url(), content=b"", headers=[("X-Dup", "a"), ("x-dup", "b")])
    assert server.requests[0].headers["x-dup"] == "a, b"


def test_chunked_bodies_are_read_whole(client: httpx.Client) -> None:
    with WebhookServer() as server:
        response = client.post(server.url(), content=iter([b"ab", b"", b"cd", b"e" * 70_000]))
    assert response.status_code == 200
    assert server.requests[0].body == b"abcd" + b"e" * 70_000


# -- scripted answers ---------------------------------------------------------------------


def test_scripted_replies_are_consumed_in_order_per_path(client: httpx.Client) -> None:
    with WebhookServer() as server:
        server.script("/hook", [500, Reply(503), 200])
        server.script(None, [418])
        server.default = Reply(204)
        statuses = [client.post(server.url("/hook")).status_code for _ in range(5)]
        other = client.post(server.url("/other")).status_code

    assert statuses == [500, 503, 200, 418, 204]
    assert other == 204
    assert [r.reply_status for r in server.requests] == [*statuses, other]


def test_reply_headers_and_body_are_sent(client: httpx.Client) -> None:
    with WebhookServer() as server:
        server.script(None, [Reply(429, headers={"Retry-After": "7"}, body=b"slow down")])
        response = client.post(server.url())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7" and response.content == b"slow down"


def test_responder_fails_chosen_ids_then_succeeds(secret: str, client: httpx.Client) -> None:
    order = ["x", "y", "x", "y", "x", "x"]
    with WebhookServer(secret) as server:
        server.responder = fail_first(2, 500, ids={"x"})
        for webhook_id in order:
            client.post(server.url(), content=BODY, headers=_headers([secret], webhook_id))

    assert [r.reply_status for r in server.requests_for("x")] == [500, 500, 200, 200]
    assert [r.reply_status for r in server.requests_for("y")] == [200, 200]
    assert server.webhook_ids() == order
    assert server.webhook_ids(distinct=True) == ["x", "y"]


def test_responder_errors_are_answered_500_and_fail_the_block(client: httpx.Client) -> None:
    def broken(request: RecordedRequest) -> Reply:
        raise RuntimeError("bug in the test's responder")

    with (
        pytest.raises(AssertionError, match="bug in the test's responder"),
        WebhookServer() as server,
    ):
        server.responder = broken
        assert client.post(server.url()).status_code == 500
        assert len(server.errors) == 1


# -- timing, resets, concurrency --------------------------------------------------------


def test_delay_holds_the_answer(client: httpx.Client) -> None:
    with WebhookServer() as server:
        server.script(None, [Reply(delay=0.4)])
        started = time.monotonic()
        assert client.post(server.url()).status_code == 200
        assert time.monotonic() - started >= 0.4
        started = time.monotonic()
        assert client.post(server.url()).status_code == 200
        assert time.monotonic() - started < 0.4


def test_client_timeout_during_a_delay_is_noted_quietly(client: httpx.Client) -> None:
    with WebhookServer() as server:
        server.script(None, [Reply(delay=3.0)])
        with pytest.raises(httpx.ReadTimeout):
            client.post(server.url(), timeout=0.3)
        assert server.wait_for(lambda reqs: reqs[0].client_gone, timeout=2.0)
        assert client.post(server.url()).status_code == 200

    first, second = server.requests
    assert first.replied_at is None and second.replied_at is not None
    assert server.errors == []


def test_close_connection_resets_without_an_answer(client: httpx.Client) -> None:
    with WebhookServer() as server:
        server.script(None, [Reply(close_connection=True)])
        # Which transport error a reset becomes is the client's business; no answer is ours.
        with pytest.raises(httpx.TransportError):
            client.post(server.url(), content=BODY)
        assert client.post(server.url()).status_code == 200

    reset, ok = server.requests
    assert reset.reply_status is None and reset.replied_at is None
    assert reset.connection != ok.connection


def test_max_concurrent_counts_requests_handled_together(client: httpx.Client) -> None:
    together = threading.Barrier(5)

    def when_all_arrived(request: RecordedRequest) -> Reply:
        together.wait(timeout=5)  # raises (-> 500, reported) unless 5 are in flight at once
        return Reply()

    with WebhookServer() as server:
        server.responder = when_all_arrived
        with ThreadPoolExecutor(5) as pool:
            statuses = list(pool.map(lambda _: client.post(server.url()).status_code, range(5)))

    assert statuses == [200] * 5
    assert server.max_concurrent == 5


def test_max_concurrent_sees_a_client_side_limit() -> None:
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    with (
        WebhookServer() as server,
        httpx.Client(limits=limits, timeout=10.0, trust_env=False) as limited,
    ):
        server.default = Reply(delay=0.2)
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: limited.post(server.url()), range(6)))

    assert server.max_concurrent == 2
    assert len({r.connection for r in server.requests}) == 2, "keep-alive connections reused"


def test_keep_alive_serves_many_requests_on_one_connection(client: httpx.Client) -> None:
    with WebhookServer() as server:
        for _ in range(3):
            client.post(server.url(), content=BODY)
    assert len({r.connection for r in server.requests}) == 1


def test_wait_for_wakes_on_arrival_and_times_out(client: httpx.Client) -> None:
    with WebhookServer() as server:
        timer = threading.Timer(0.2, lambda: client.post(server.url("/late")))
        timer.start()
        assert server.wait_for(1, timeout=5)
        assert server.wait_for(lambda reqs: reqs[0].path == "/late", timeout=1)
        timer.join()
        started = time.monotonic()
        assert not server.wait_for(2, timeout=0.2)
        assert time.monotonic() - started < 1
        server.clear()
        assert server.requests == [] and server.max_concurrent == 0


def test_stop_cuts_connections_and_start_reuses_the_port(client: httpx.Client) -> None:
    server = WebhookServer().start()
    try:
        url = server.url()
        assert client.post(url).status_code == 200
        server.stop()
        with pytest.raises(httpx.ConnectError):
            client.post(url)
        server.start()
        assert server.url() == url
        assert client.post(url).status_code == 200
    finally:
        server.stop()


def test_refused_url_refuses(client: httpx.Client) -> None:
    with pytest.raises(httpx.ConnectError):
        client.post(refused_url(), content=BODY)


# -- the fast receiver -------------------------------------------------------------------


def test_fast_server_counts_requests_and_distinct_ids(client: httpx.Client) -> None:
    with FastWebhookProcess() as fast:
        for i in range(300):
            response = client.post(fast.url(), content=BODY, headers={"Webhook-Id": f"m{i % 100}"})
            assert (response.status_code, response.content) == (200, b"")
        stats = fast.stats()
        assert fast.stats().requests == stats.requests == 300, "/stats is not counted"
        assert stats.ids == 100
        assert stats.first_at is not None and stats.last_at is not None
        assert stats.first_at <= stats.last_at
        assert client.get(fast.url("/stats")).json()["requests"] == 300
        fast.reset()
        assert fast.stats().requests == 0


def test_fast_server_parses_split_and_pipelined_requests() -> None:
    request = b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nwebhook-id: a\r\n\r\nhello"
    with FastWebhookProcess() as fast, socket.create_connection(("127.0.0.1", fast.port)) as sock:
        sock.sendall(request[:20])
        time.sleep(0.05)
        sock.sendall(request[20:-2])
        time.sleep(0.05)
        sock.sendall(request[-2:] + request + request.replace(b"id: a", b"id: b"))
        received = b""
        while received.count(b"HTTP/1.1 200 OK") < 3:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed after {received!r}"
            received += chunk
        stats = fast.stats()
    assert (stats.requests, stats.ids) == (3, 2)


def test_fast_server_answers_the_configured_status(client: httpx.Client) -> None:
    with FastWebhookProcess(status=503) as fast:
        assert client.post(fast.url(), content=BODY).status_code == 503
        assert fast.stats().requests == 1


def test_fast_server_delay_does_not_block_other_connections(client: httpx.Client) -> None:
    def timed_post(_: int) -> float:
        started = time.monotonic()
        assert client.post(fast.url(), content=BODY).status_code == 200
        return time.monotonic() - started

    with FastWebhookProcess(delay=0.5) as fast, ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        latencies = list(pool.map(timed_post, range(4)))
        total = time.monotonic() - started

    assert min(latencies) >= 0.5
    assert total < 1.5, "delayed answers were serialised"


def test_fast_server_verifies_a_sample_when_given_a_secret(
    secret: str, client: httpx.Client
) -> None:
    with FastWebhookProcess(secret=secret) as fast:
        client.post(fast.url(), content=BODY, headers=_headers([secret]))
        stats = fast.stats()
        assert (stats.verified, stats.verify_failures) == (1, 0)
        fast.reset()
        client.post(fast.url(), content=BODY, headers=_headers([new_secret()]))
        stats = fast.stats()
        assert (stats.verified, stats.verify_failures) == (0, 1)
