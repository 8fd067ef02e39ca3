"""A seeded fuzz of ``outbox-relay run --config``: each case mutates a working config file
(an odd value, a dropped or doubled line, garbage, bytes that are not UTF-8) and runs the real
CLI. Every mutation ends one of two ways: exit 2 with one line naming the problem, or a
clean start that exits 0 on SIGTERM. Never a traceback, never a relay that starts and then
breaks. The seeds are fixed, so a failure names its case; raise CASES to search wider.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.cli import RelayProcess, migrate, start_cli

pytestmark = pytest.mark.acceptance

CASES = 24
BASE = """\
batch_size = 100
poll_interval = "200ms"
lease_seconds = "60s"
hold_seconds = "5s"
heartbeat_seconds = "1s"
bucket_lease_seconds = "5s"
shutdown_grace = "2s"
log_level = "info"

[[routes]]
name = "hook"
topics = ["orders.*"]
sink = "webhook"
url = "http://127.0.0.1:9/hook"
secret = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"
allow_private_network = true
timeout_s = 2.0
max_attempts = 5
backoff_initial_s = 0.5
backoff_max_s = 30.0
concurrency = 4
"""
ODD_VALUES = [
    "nan", "inf", "-inf", "-1", "0", "1.5", "2147483648", "9223372036854775807", "1e308",
    "true", "[]", "{}", '""', '"x"', '"0s"', '"-5s"', '"30d"', '"2147483648s"', '"1e9s"',
    '"\\u00e9"', '"' + "x" * 300 + '"', '"http://0177.0.0.1/"', '"http://[::1/"',
    '"whsec_!!"', '["a", 1]', '"debug"', '"10ms"',
]  # fmt: skip
GARBAGE = ["= = =", "[[routes]", "[routes]", 'name = "hook"', "x = 1", "\x7f = 1", "[kafka]"]


def mutate(rng: random.Random) -> bytes:
    lines = BASE.splitlines()
    for _ in range(rng.randint(1, 2)):
        index = rng.randrange(len(lines))
        kind = rng.choice(["value", "value", "value", "drop", "double", "garbage", "bytes"])
        if kind == "value" and " = " in lines[index]:
            key = lines[index].split(" = ", 1)[0]
            lines[index] = f"{key} = {rng.choice(ODD_VALUES)}"
        elif kind == "drop":
            del lines[index]
        elif kind == "double":
            lines.insert(index, lines[index])
        elif kind == "garbage":
            lines.insert(index, rng.choice(GARBAGE))
    text = ("\n".join(lines) + "\n").encode("utf-8")
    if rng.random() < 0.1:  # bytes that are not UTF-8 somewhere in the file
        at = rng.randrange(len(text))
        text = text[:at] + b"\xff\xfe" + text[at:]
    return text


@pytest.mark.parametrize("seed", range(CASES))
def test_a_mutated_config_is_refused_in_one_line_or_runs_and_stops_cleanly(
    seed: int, database_url: str, tmp_config: Callable[..., Path]
) -> None:
    migrate(database_url)
    config = tmp_config("")
    config.write_bytes(mutate(random.Random(seed)))
    relay = RelayProcess(
        start_cli(
            "run",
            "--config",
            str(config),
            "--metrics-port",
            "0",
            env={"OUTBOX_DATABASE_URL": database_url},
        )
    )
    with relay:
        started = relay.wait_for(r"\bstarted\b", 20)
        code = relay.stop(signal.SIGTERM, timeout=20) if started else relay.popen.wait(20)
    case = f"seed {seed}:\n{config.read_bytes().decode('utf-8', 'replace')}\n{relay.output}"
    assert "Traceback" not in relay.output, case
    if started:
        assert code == 0, case
    else:
        lines = [line for line in relay.output.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, case
        assert lines[0].startswith("outbox-relay: error: "), case
