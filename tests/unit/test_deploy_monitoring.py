"""The monitoring files in deploy/ are valid, tested and agree with the relay's metrics.

No server runs here: ``promtool`` checks the rules, runs their unit tests
(deploy/prometheus/alerts_test.yml) and parses every dashboard query.
tests/integration/test_dashboards.py evaluates them against a real relay.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness.prometheus import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD,
    EXAMPLE_CONFIG,
    RELAY_METRICS,
    dashboard_queries,
    fast_alert_rules,
    instantiate,
    require_binary,
    variable_queries,
)

EXPECTED_ALERTS = {
    "OutboxDeliveryLagHigh",
    "OutboxDeadLetters",
    "OutboxRelayDown",
    "OutboxNoRelayUp",
    "OutboxBucketsUnowned",
    "OutboxRelayNotReady",
    "OutboxRouteDisabled",
    "OutboxLaneFailing",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def promtool(*args: str, cwd: Path | None = None) -> str:
    """Run promtool; fail with its output unless it exits 0."""
    argv = [require_binary("promtool"), *args]
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def alert_blocks(text: str) -> dict[str, str]:
    """Alert name -> the text of its rule (alerts.yml is a flat list of rules)."""
    parts = re.split(r"(?m)^\s+- alert:\s*", text)[1:]
    return {part.split()[0]: part for part in parts}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\boutbox_[a-z_]+\b", expr))


def exported(name: str) -> bool:
    """True for a relay metric, or a histogram's _bucket/_sum/_count series."""
    if RELAY_METRICS.get(name):
        return True
    base = next((name.removesuffix(s) for s in HISTOGRAM_SERIES if name.endswith(s)), None)
    return base is not None and RELAY_METRICS.get(base) == "histogram"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return loaded


# -- alert rules --------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    output = promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in output


def test_alert_rule_unit_tests_pass() -> None:
    """Each alert: silent before its ``for:``, firing after (labels and annotations
    rendered exactly), gone once the series recovers."""
    output = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert "SUCCESS" in output


def test_alerts_are_the_documented_set_in_group_outbox_relay() -> None:
    text = ALERTS.read_text("utf-8")
    assert re.search(r"(?m)^\s+- name: outbox-relay$", text)
    assert set(alert_blocks(text)) == EXPECTED_ALERTS
    readme = (ALERTS.parents[1] / "README.md").read_text("utf-8")
    for name in EXPECTED_ALERTS:
        assert name in readme, f"deploy/README.md has no runbook entry for {name}"


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_has_severity_summary_description_and_unit_tests(name: str) -> None:
    block = alert_blocks(ALERTS.read_text("utf-8"))[name]
    assert re.search(r"severity: (page|ticket)\b", block)
    assert "summary:" in block and "description:" in block
    tests = ALERTS_TEST.read_text("utf-8")
    checks = re.findall(rf"alertname: {name}\n\s+exp_alerts:(.*)", tests)
    assert any(c.strip() == "[]" for c in checks), f"{name}: never shown silent"
    assert any(c.strip() == "" for c in checks), f"{name}: never shown firing"


def test_lag_rule_matches_the_issue() -> None:
    block = alert_blocks(ALERTS.read_text("utf-8"))["OutboxDeliveryLagHigh"]
    assert "expr: max by (topic) (outbox_oldest_pending_age_seconds) > 300\n" in block
    assert "for: 5m" in block and "severity: page" in block


def test_rules_can_be_sped_up_for_tests_and_stay_valid(tmp_path: Path) -> None:
    fast = fast_alert_rules(ALERTS.read_text("utf-8"), for_="2s", lag_threshold="3")
    assert "outbox_oldest_pending_age_seconds) > 3\n" in fast
    assert set(re.findall(r"for: (\S+)", fast)) == {"2s"}
    path = tmp_path / "fast.yml"
    path.write_text(fast, "utf-8")
    promtool("check", "rules", str(path))


def test_example_prometheus_config_is_valid() -> None:
    output = promtool("check", "config", str(EXAMPLE_CONFIG))
    assert "SUCCESS: 1 rule files found" in output
    assert "job_name: outbox-relay\n" in EXAMPLE_CONFIG.read_text("utf-8")


# -- dashboard ----------------------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_10_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "outbox-relay"
    assert dashboard["schemaVersion"] >= 38
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {k: label for k, (_, label) in variable_queries(dashboard).items()} == {
        "topic": "topic",
        "route": "route",
    }
    for name in ("topic", "route"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_every_panel_uses_the_datasource_variable_and_has_its_own_place(
    dashboard: dict[str, Any],
) -> None:
    ids: list[int] = []
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_ranges_use_rate_interval(dashboard: dict[str, Any]) -> None:
    for title, expr in dashboard_queries(dashboard):
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), f"{title}: {expr}"


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each query as a recording rule: ``promtool check rules`` parses them all (and the
    variables' series selectors)."""
    queries = dashboard_queries(dashboard)
    queries += [(name, selector) for name, (selector, _) in variable_queries(dashboard).items()]
    rules = [
        f"      - record: dashboard_query_{n}\n        expr: {json.dumps(instantiate(expr))}"
        for n, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text("groups:\n  - name: dashboard\n    rules:\n" + "\n".join(rules) + "\n")
    assert f"SUCCESS: {len(queries)} rules found" in promtool("check", "rules", str(path))


def test_dashboard_and_alerts_name_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(e) for _, e in dashboard_queries(dashboard)))
    used |= set().union(*(metric_names(s) for s, _ in variable_queries(dashboard).values()))
    used |= metric_names(ALERTS.read_text("utf-8"))
    assert {name for name in used if not exported(name)} == set()


def test_dashboard_shows_every_exported_metric(dashboard: dict[str, Any]) -> None:
    text = json.dumps(dashboard)
    assert {name for name in RELAY_METRICS if name not in text} == set()
