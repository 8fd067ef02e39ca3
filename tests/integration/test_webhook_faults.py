"""Webhook lanes under faults, with ``outbox-relay run`` as a real child process.

A relay killed in the middle of a request redelivers later with the same ``webhook-id``; a
relay stopped with SIGTERM finishes its requests first; and no secret (webhook secret,
database password) ever reaches the logs, the recorded errors or the operator commands.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox_lib import Outbox
from tests.acceptance.cli import run_cli
from tests.harness.relay import RelayProcess, scalar, wait_until
from tests.harness.webhook import Reply, WebhookServer, new_secret, refused_url
from tests.integration.test_faults import FAST_TAKEOVER

pytestmark = pytest.mark.integration


def hook_config(tmp_path: Path, *routes: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text("\n".join(routes), encoding="utf-8")
    return str(path)


def hook_route(
    name: str, url: str, secret: str, topics: str = '["orders.*"]', **extra: object
) -> str:
    lines = [
        "[[routes]]",
        f'name = "{name}"',
        f"topics = {topics}",
        'sink = "webhook"',
        f'url = "{url}"',
        f'secret = "{secret}"',
        "allow_private_network = true",
        "backoff_initial_s = 0.1",
        "backoff_max_s = 1",
    ]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def publish(engine: Engine, count: int, topic: str = "orders.created") -> list[str]:
    ids = []
    with Session(engine) as session, session.begin():
        for n in range(count):
            ids.append(str(Outbox().publish(session, topic, {"n": n}, key=f"k{n}")))
    return ids


def test_relay_killed_mid_request_redelivers_with_the_same_webhook_id(
    url: str, engine: Engine, tmp_path: Path
) -> None:
    secret = new_secret()
    with WebhookServer(secret) as server:
        server.default = Reply(200, delay=30.0)  # every request hangs until the kill
        config = hook_config(tmp_path, hook_route("hook", server.url(), secret, timeout_s=60))
        ids = publish(engine, 5)
        log = tmp_path / "relay.log"
        relay = RelayProcess(url, "", log, OUTBOX_CONFIG=config, **FAST_TAKEOVER).wait_started()
        try:
            assert server.wait_for(5, timeout=20), server.requests
            relay.kill()
        finally:
            relay.stop_quietly()
        killed_at = time.time()
        assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 0
        server.default = Reply(200)
        # A log of its own: the first relay's "started" line must not pass for this one's.
        second_log = tmp_path / "relay-2.log"
        relay = RelayProcess(url, "", second_log, OUTBOX_CONFIG=config, **FAST_TAKEOVER)
        relay.wait_started()
        started_at = time.time()
        try:
            wait_until(
                lambda: scalar(url, "SELECT count(*) FROM outbox.delivery") == 5, 30, "redelivery"
            )
        finally:
            assert relay.terminate() == 0
        # The killed relay's leases count only while its relay row lives (3 s after its last
        # heartbeat here), not for the 120 s claim lease; then the running relay takes its
        # buckets at its next heartbeat (0.5 s) and claims within a poll interval (0.2 s).
        takeover_by = max(killed_at + 3.0, started_at) + 0.5 + 0.2
        for message_id in ids:
            attempts = server.requests_for(message_id)
            # One request hung until the kill, then one redelivery answered at once.
            assert [r.received_at > killed_at for r in attempts] == [False, True], (
                message_id, server.webhook_ids(),
            )  # fmt: skip
            assert all(r.ok for r in attempts)  # every attempt signed, verified
            assert {r.headers["idempotency-key"] for r in attempts} == {message_id}
            assert attempts[1].received_at < takeover_by + 2.0, "2 s for a loaded machine"
        assert scalar(url, "SELECT count(*) FROM outbox.dead_letter") == 0
        assert scalar(url, "SELECT count(*) FROM outbox.message") == 0


def test_sigterm_lets_requests_in_flight_finish_and_records_them(
    url: str, engine: Engine, tmp_path: Path
) -> None:
    secret = new_secret()
    with WebhookServer(secret) as server:
        server.default = Reply(200, delay=1.5)
        config = hook_config(tmp_path, hook_route("hook", server.url(), secret))
        publish(engine, 3)
        log = tmp_path / "relay.log"
        relay = RelayProcess(url, "", log, OUTBOX_CONFIG=config).wait_started()
        try:
            assert server.wait_for(3, timeout=20)
        finally:
            code = relay.terminate()
        assert code == 0, log.read_text()
        assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 3
        assert len(server.requests) == 3  # answered before the exit: none is sent again
        assert scalar(url, "SELECT count(*) FROM outbox.route_pending") == 0


def _with_password(database_url: str, password: str) -> str:
    parts = urlsplit(database_url)
    user = parts.username or "postgres"
    host = parts.hostname or ""  # empty with ?host=/socket/dir
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def test_secrets_never_reach_logs_errors_or_operator_output(
    url: str, engine: Engine, tmp_path: Path
) -> None:
    """Debug logs of a relay seeing every kind of failure, and every operator command's
    output, never contain a webhook secret (either form) or the database password."""
    old, new = new_secret(), new_secret()
    password = "pw-" + base64.b32encode(b"never-log-me").decode().rstrip("=")
    db_url = _with_password(url, password)  # trust auth on the test server ignores it
    with WebhookServer(old, new) as server:
        server.script(
            "/hook",
            [
                Reply(400, body=b"bad"),
                Reply(500),
                Reply(410, body=b"gone"),
                Reply(429, {"retry-after": "1"}),
            ],
        )
        config = hook_config(
            tmp_path,
            hook_route("hook", server.url("/hook"), f"{old} {new}", max_attempts=2),
            hook_route("down", refused_url(), old, topics='["down.*"]', max_attempts=2),
        )
        publish(engine, 4)
        publish(engine, 2, topic="down.x")
        publish(engine, 1, topic="stray.x")
        log = tmp_path / "relay.log"
        env = {"OUTBOX_CONFIG": config, "OUTBOX_LOG_LEVEL": "DEBUG"}
        relay = RelayProcess(db_url, "", log, **env).wait_started()
        try:
            wait_until(
                lambda: scalar(url, "SELECT count(*) FROM outbox.message") == 0, 30, "all settled"
            )
        finally:
            assert relay.terminate() == 0
        assert all(r.ok for r in server.requests)
        outputs = [log.read_text()]
        for args in (("status", "--json"), ("status",), ("dead-letters", "list", "--json")):
            result = run_cli(*args, env={"OUTBOX_DATABASE_URL": db_url, "OUTBOX_CONFIG": config})
            assert result.returncode == 0, result.stderr
            outputs += [result.stdout, result.stderr]
        recorded = scalar(
            url,
            "SELECT string_agg(coalesce(last_error, '') || reason, ' ') FROM outbox.dead_letter",
        )
        outputs.append(str(recorded))
    text = "\n".join(outputs)
    assert "dead-lettered" in outputs[0] and "route hook" in outputs[0]  # the log did talk
    for secret in (old, new):
        assert secret not in text
        assert secret.removeprefix("whsec_") not in text
    assert password not in text
