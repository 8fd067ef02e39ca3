"""A real Prometheus server for tests: scrapes given targets, evaluates given rule files.

:class:`PrometheusServer` runs the ``prometheus`` binary (Debian's package; ``make
install`` puts it on a CI machine) in a temp directory with scrape and evaluation
intervals of 1 s, on a free 127.0.0.1 port, and answers PromQL through the HTTP API::

    with PrometheusServer(["127.0.0.1:9464"], rule_files=[rules]) as prom:
        prom.wait_for_targets_up()
        assert prom.query("max(outbox_ready)")[0].value == 1
        assert prom.alert_state("OutboxDeliveryLagHigh") is None

:func:`require_binary` skips a test when a binary is missing, unless ``CI`` is set: a CI
machine that lacks one is broken, so there the test fails instead.

The second half knows the monitoring files deploy/ ships: their paths, the metric names
they may use, Grafana's variables as a test instantiates them, and the textual speed-up of
alerts.yml (every ``for:`` and the lag threshold) that lets a test see alerts in seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.harness.ports import free_port, port_accepts

HOST = "127.0.0.1"
JOB = "outbox-relay"
_START_ATTEMPTS = 3


class PromQLError(AssertionError):
    """Prometheus rejected a query (bad syntax, unknown function, wrong types...)."""


def require_binary(name: str) -> str:
    """Path of ``name`` on PATH; skip the test without it, or fail when ``CI`` is set."""
    path = shutil.which(name)
    if path:
        return path
    reason = (
        f"`{name}` is not on PATH: install Prometheus (Debian: apt-get install prometheus; "
        "`make install` does it when it can)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is an error")
    pytest.skip(reason)


@dataclass(frozen=True)
class Sample:
    """One element of an instant query's result; a scalar result has no labels."""

    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Alert:
    """One pending or firing alert from ``/api/v1/alerts`` (resolved ones are not listed)."""

    name: str
    state: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    value: float


def config_text(targets: Sequence[str], rule_files: Sequence[Path], job: str = JOB) -> str:
    """A prometheus.yml scraping ``targets`` as ``job`` every second. JSON is YAML, and
    quoting every value through it keeps paths and addresses intact."""
    return "\n".join(
        [
            "global:",
            "  scrape_interval: 1s",
            "  scrape_timeout: 1s",
            "  evaluation_interval: 1s",
            f"rule_files: {json.dumps([str(p) for p in rule_files])}",
            "scrape_configs:",
            f"  - job_name: {json.dumps(job)}",
            f"    static_configs: [{{targets: {json.dumps(list(targets))}}}]",
            "",
        ]
    )


class PrometheusServer:
    """``prometheus`` as a child process with its own data directory: ``workdir`` if
    given (kept, for post-mortems), else a temp directory removed on stop."""

    def __init__(
        self,
        targets: Iterable[str],
        rule_files: Iterable[Path] = (),
        *,
        job: str = JOB,
        workdir: Path | None = None,
    ) -> None:
        self.targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job = job
        self.port = 0
        self._given_dir = workdir
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client = httpx.Client(timeout=10.0)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "prometheus.log"

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        """Spawn and wait for ``/-/ready``; a new port if the first was taken meanwhile."""
        binary = require_binary("prometheus")
        self._dir = self._given_dir or Path(tempfile.mkdtemp(prefix="outbox-prometheus-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        config = self._dir / "prometheus.yml"
        config.write_text(config_text(self.targets, self.rule_files, self.job), "utf-8")
        output = ""
        for _ in range(_START_ATTEMPTS):
            self.port = free_port(HOST)
            self._spawn(binary, config)
            if self._ready(timeout):
                return self
            output = self._terminate()
        self._remove_dir()
        raise RuntimeError(f"prometheus did not become ready:\n{output}")

    def _spawn(self, binary: str, config: Path) -> None:
        assert self._dir is not None
        self._log = self.log_path.open("ab")
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self._dir / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
            "--log.level=warn",
        ]
        self._proc = subprocess.Popen(
            argv, cwd=self._dir, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def _ready(self, timeout: float) -> bool:
        """Poll ``/-/ready`` (200 once the TSDB is open and rules loaded); False if it died."""
        deadline = time.monotonic() + timeout
        while self._proc is not None and self._proc.poll() is None:
            if port_accepts(HOST, self.port) and self._get_ok("/-/ready"):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return False

    def _get_ok(self, path: str) -> bool:
        try:
            return self._client.get(self.url + path).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s), then remove the data directory."""
        self._terminate()
        self._client.close()
        self._remove_dir()

    def _terminate(self) -> str:
        """Stop the process if running; return its log (for error messages)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.log_path.read_text("utf-8", "replace") if self._dir else ""

    def _remove_dir(self) -> None:
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    # -- the HTTP API -------------------------------------------------------------------

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """``data`` of an API answer; PromQLError with Prometheus's reason on an error."""
        response = self._client.get(f"{self.url}/api/v1/{path}", params=params)
        try:
            body = response.json()
        except ValueError as exc:
            raise PromQLError(f"{path}: HTTP {response.status_code}: {response.text}") from exc
        if body.get("status") != "success":
            subject = (params or {}).get("query", path)
            raise PromQLError(f"{subject}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluate ``expr`` now; raise PromQLError if Prometheus rejects it."""
        data = self._api("query", {"query": expr})
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [Sample(item["metric"], float(item["value"][1])) for item in result]
        if kind == "scalar":
            return [Sample({}, float(result[1]))]
        raise PromQLError(f"{expr}: a {kind} result, not an instant vector or scalar")

    def value(self, expr: str) -> float | None:
        """The single value ``expr`` yields now; None if it yields nothing."""
        samples = self.query(expr)
        assert len(samples) <= 1, f"{expr}: {len(samples)} series, expected at most one"
        return samples[0].value if samples else None

    def alerts(self) -> list[Alert]:
        """Every pending or firing alert."""
        return [
            Alert(
                name=item["labels"]["alertname"],
                state=item["state"],
                labels=item["labels"],
                annotations=item.get("annotations", {}),
                value=float(item["value"]),
            )
            for item in self._api("alerts")["alerts"]
        ]

    def alert_state(self, name: str, **labels: str) -> str | None:
        """``"firing"``, ``"pending"`` or None (inactive or resolved) for one alert; with
        ``labels``, only instances carrying them count (firing wins over pending)."""
        states = {
            alert.state
            for alert in self.alerts()
            if alert.name == name and all(alert.labels.get(k) == v for k, v in labels.items())
        }
        return "firing" if "firing" in states else "pending" if states else None

    def wait_for_alert(
        self, name: str, state: str | None, timeout: float = 30.0, **labels: str
    ) -> None:
        """Until :meth:`alert_state` is ``state`` (None: resolved or inactive)."""
        self.wait_for(
            lambda: self.alert_state(name, **labels) == state,
            timeout,
            lambda: f"{name}{labels or ''} {state or 'inactive'} (alerts: {self.alerts()})",
        )

    def targets_up(self) -> int:
        """How many scrape targets were healthy at their last scrape."""
        active = self._api("targets", {"state": "active"})["activeTargets"]
        return sum(1 for target in active if target["health"] == "up")

    def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        what: str | Callable[[], str],
        every: float = 0.25,
    ) -> None:
        """Poll ``predicate`` until true; on timeout, fail with ``what`` (a callable is
        asked then, so it can report the last value seen) and Prometheus's log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(every)
        described = what() if callable(what) else what
        tail = self.log_path.read_text("utf-8", "replace")[-2000:] if self._dir else ""
        raise AssertionError(f"timed out after {timeout}s waiting for {described}\n{tail}")

    def wait_for_targets_up(self, count: int | None = None, timeout: float = 20.0) -> None:
        """Until ``count`` (default: every) target has been scraped successfully."""
        want = len(self.targets) if count is None else count
        self.wait_for(lambda: self.targets_up() >= want, timeout, f"{want} targets up")

    def wait_for_value(
        self, expr: str, accept: Callable[[float], bool], timeout: float, what: str
    ) -> float:
        """Until ``expr`` yields one value ``accept`` takes; return that value."""
        seen: dict[str, float | None] = {"last": None}

        def check() -> bool:
            found = seen["last"] = self.value(expr)
            return found is not None and not math.isnan(found) and accept(found)

        self.wait_for(check, timeout, lambda: f"{what} (last: {expr} = {seen['last']})")
        return float(seen["last"] or 0.0)


# -- the files deploy/ ships ------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
EXAMPLE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "outbox-relay-dashboard.json"

# What the relay exports (CONTRACT.md section 7 and the observability issue): name -> type.
RELAY_METRICS = {
    "outbox_pending_messages": "gauge",
    "outbox_oldest_pending_age_seconds": "gauge",
    "outbox_delivered_total": "counter",
    "outbox_delivery_failures_total": "counter",
    "outbox_dead_letters": "gauge",
    "outbox_delivery_latency_seconds": "histogram",
    "outbox_relay_info": "gauge",
    "outbox_ready": "gauge",
    "outbox_database_up": "gauge",
    "outbox_batch_size": "histogram",
    "outbox_claim_duration_seconds": "histogram",
    "outbox_record_duration_seconds": "histogram",
    "outbox_delivery_errors_total": "counter",
    "outbox_buckets_held": "gauge",
    "outbox_buckets_unowned": "gauge",
    "outbox_relays_live": "gauge",
    "outbox_route_disabled": "gauge",
    "outbox_route_paused": "gauge",
    "outbox_lane_failures_total": "counter",
}

# Grafana's variables as a test instantiates them: every topic, every route.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "5m",
    "$topic": ".*",
    "$route": ".*",
}


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel, rows' own panels too."""
    found: list[tuple[str, str]] = []
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel["title"], target["expr"]))
        found.extend(dashboard_queries(panel))
    return found


def instantiate(expr: str) -> str:
    """``expr`` with Grafana's variables replaced, as Grafana would send it."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", GRAFANA_VARIABLES[name])
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def fast_alert_rules(text: str, for_: str = "2s", lag_threshold: str = "3") -> str:
    """alerts.yml with every ``for:`` set to ``for_`` and the lag threshold lowered, so a
    test sees in seconds what production sees in minutes."""
    text, fors = re.subn(r"(?m)^(\s+for:\s*)\S+$", rf"\g<1>{for_}", text)
    text, lags = re.subn(
        r"(?m)^(\s+expr:.*outbox_oldest_pending_age_seconds.*>\s*)\d+$",
        rf"\g<1>{lag_threshold}",
        text,
    )
    assert fors >= 1 and lags == 1, f"alerts.yml changed shape ({fors} for:, {lags} lag rules)"
    return text


def variable_queries(dashboard: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Query variable -> (series selector, label) of its ``label_values(selector, label)``."""
    found: dict[str, tuple[str, str]] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
        assert match, f"variable {variable['name']}: not label_values(...): {text}"
        found[variable["name"]] = (match[1], match[2])
    return found
