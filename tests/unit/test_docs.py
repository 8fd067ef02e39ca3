"""docs/ against the code: the generated references are current, nothing the contract names is
missing, every Python block compiles and every link and example it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay import docgen
from relay.config import OPTIONS
from relay.metrics import METRICS, Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
# CONTRACT section 7: the metric names users rely on.
CONTRACT_METRICS = (
    "outbox_pending_messages",
    "outbox_oldest_pending_age_seconds",
    "outbox_delivered_total",
    "outbox_delivery_failures_total",
    "outbox_dead_letters",
    "outbox_delivery_latency_seconds",
)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
EXAMPLE = re.compile(r"docs/examples/[\w./-]+\.py|(?<![\w/])examples/[\w./-]+\.py")


def test_generated_docs_are_current() -> None:
    stale = [p.name for p, text in docgen.expected(DOCS).items() if p.read_text("utf-8") != text]
    assert not stale, f"run `make docs`: {stale} differ from what the code says"


def test_docgen_check_passes_and_names_a_stale_file(tmp_path: Path) -> None:
    assert docgen.main(["--check", "--docs", str(DOCS)]) == 0
    for name in docgen.GENERATED:
        (tmp_path / name).write_text((DOCS / name).read_text("utf-8"), encoding="utf-8")
    page = tmp_path / "metrics.md"
    page.write_text(page.read_text("utf-8").replace("| counter |", "| gauge |", 1), "utf-8")
    assert docgen.main(["--check", "--docs", str(tmp_path)]) == 1
    assert docgen.main(["--docs", str(tmp_path)]) == 0
    assert page.read_text("utf-8") == (DOCS / "metrics.md").read_text("utf-8")


def test_configuration_lists_every_option() -> None:
    text = (DOCS / "configuration.md").read_text("utf-8")
    for option in OPTIONS:
        row = f"| `{option.env}` | `{option.name}` |"
        assert row in text, option.name


def test_every_contract_metric_is_documented_as_such() -> None:
    text = (DOCS / "metrics.md").read_text("utf-8")
    assert {spec.name for spec in METRICS if spec.contract} == set(CONTRACT_METRICS)
    for name in CONTRACT_METRICS:
        assert re.search(rf"^\| `{name}` \| \w+ \| .* \| yes \|", text, re.MULTILINE), name


def test_the_metrics_table_is_what_the_registry_serves() -> None:
    registry: CollectorRegistry = Metrics("r", "outbox").registry
    served = {(m.name, m.type, m.documentation) for m in registry.collect()}
    declared = {(s.name.removesuffix("_total"), s.kind, s.help) for s in METRICS}
    assert served == declared


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_compile(page: Path) -> None:
    """Snippets may ``await`` at top level, as they would inside the reader's coroutine."""
    for number, block in enumerate(PYTHON_BLOCK.findall(page.read_text("utf-8")), 1):
        name = f"{page.name} python block {number}"
        compile(block, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("page", [*PAGES, README], ids=[*(p.name for p in PAGES), "README"])
def test_links_and_examples_exist(page: Path) -> None:
    text = page.read_text("utf-8")
    for target in LINK.findall(text):
        if "://" not in target and not target.startswith("mailto:"):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    for example in EXAMPLE.findall(text):
        base = ROOT if example.startswith("docs/") else page.parent
        assert (base / example).is_file(), f"{page.name} names missing {example}"


def test_the_page_checks_have_something_to_check() -> None:
    """The two tests above loop over what their patterns find: a pattern that stops
    matching would make them pass on nothing."""
    texts = [page.read_text("utf-8") for page in [*PAGES, README]]
    assert sum(len(PYTHON_BLOCK.findall(text)) for text in texts) >= 10
    assert sum(len(LINK.findall(text)) for text in texts) >= 30
    assert sum(len(EXAMPLE.findall(text)) for text in texts) >= 3


def test_readme_shows_the_two_commands_and_links_the_docs() -> None:
    text = README.read_text("utf-8")
    assert "make demo" in text and "make test" in text
    for page in ("quickstart", "guarantees", "configuration", "operations", "metrics"):
        assert f"(docs/{page}.md)" in text, page
