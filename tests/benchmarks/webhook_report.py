"""The webhook benchmark's figures: rich tables, ``webhooks.json`` and ``webhooks.png``."""

from __future__ import annotations

import json
import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .results import Throughput

GOAL_PER_S = 5_000  # the goal for one relay on this 2-core machine
ISOLATION_LIMIT = 0.10  # a slow endpoint may cost the fast route at most this share
ORDER = {"ceiling": 0, "sink": 1, "relay": 2, "naive": 3}
CPU_LABELS = ("this process", "postgres", "endpoint")
_CONCURRENCY = re.compile(r", concurrency \d+$")


def _kind(row: Throughput) -> str:
    return str(row.details.get("kind", "?"))


def _concurrency(row: Throughput) -> int:
    return int(row.details.get("concurrency", 0))


def _label(row: Throughput) -> str:
    """The scenario without its concurrency (a column of its own)."""
    return _CONCURRENCY.sub("", row.scenario).removeprefix("isolation: ")


def drain_rows(rows: list[Throughput]) -> list[Throughput]:
    """Ceilings, sink and relay per concurrency (highest first), the naive relay last."""
    shown = [r for r in rows if _kind(r) in ORDER or _kind(r) == "?"]
    return sorted(
        shown, key=lambda r: (_kind(r) == "naive", -_concurrency(r), ORDER.get(_kind(r), 9))
    )


def _ceiling(rows: list[Throughput], concurrency: int) -> float | None:
    """The best httpx layout at this concurrency: the library's ceiling here."""
    rates = [r.rate for r in rows if _kind(r) == "ceiling" and _concurrency(r) == concurrency]
    return max((rate for rate in rates if rate), default=None)


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for name in columns:
        left = name in ("scenario", "variant", "notes")
        table.add_column(name, justify="left" if left else "right", no_wrap=name != "notes")
    return table


def drain_table(rows: list[Throughput], headline: str) -> Table:
    table = _table(
        f"Webhook drain to a fast local endpoint: {headline}",
        (
            "scenario",
            "conc.",
            "delivered",
            "seconds",
            "deliv./s",
            "vs best httpx",
            f"goal {GOAL_PER_S // 1000}k",
            "CPU s/1k: self",
            "postgres",
            "endpoint",
            "WAL B/msg",
        ),
    )
    for row in drain_rows(rows):
        cpu = row.details.get("cpu_s_per_1000", {})
        wal = row.details.get("wal_bytes_per_message")
        base = _ceiling(rows, _concurrency(row)) if _kind(row) != "naive" else None
        table.add_row(
            _label(row),
            str(_concurrency(row) or "-"),
            f"{row.delivered:,}" if row.rate else "-",
            f"{row.seconds:.2f}" if row.rate else "-",
            _rate(row),
            f"{row.rate / base:.0%}" if row.rate and base else "-",
            _goal(row),
            *(f"{cpu[k]:.2f}" if k in cpu else "-" for k in CPU_LABELS),
            f"{wal:,.0f}" if wal is not None else "-",
        )
    return table


def _rate(row: Throughput) -> str:
    if row.rate is None:
        return row.status
    return f"{row.rate:,.0f}" + (" (partial)" if row.status == "partial" else "")


def _goal(row: Throughput) -> str:
    if _kind(row) != "relay":
        return ""
    return "pass" if (row.rate or 0) >= GOAL_PER_S and row.status == "ok" else "FAIL"


def isolation_verdicts(rows: list[Throughput]) -> list[dict[str, Any]]:
    """Each variant beside the slow route against the fast route alone."""
    found = [r for r in rows if _kind(r) == "isolation"]
    alone = next((r for r in found if r.details.get("variant") == "fast route alone"), None)
    verdicts = []
    for row in found:
        base = alone.rate if alone else None
        ratio = row.rate / base if row.rate and base else None
        verdicts.append(
            {
                "variant": row.details.get("variant"),
                "concurrency": _concurrency(row),
                "fast_per_s": row.rate,
                "alone_per_s": base,
                "ratio": ratio,
                "slowdown": None if ratio is None else 1 - ratio,
                "pass": None if ratio is None or row is alone else 1 - ratio <= ISOLATION_LIMIT,
                "slow_delivered_meanwhile": row.details.get("slow_delivered_meanwhile"),
                "row": row,
            }
        )
    return verdicts


def isolation_table(rows: list[Throughput]) -> Table | None:
    verdicts = isolation_verdicts(rows)
    if not verdicts:
        return None
    table = _table(
        "Slow-endpoint isolation: the fast route beside a slow one (same concurrency)",
        (
            "variant",
            "conc.",
            "fast delivered",
            "seconds",
            "fast deliv./s",
            "vs alone",
            "slowdown",
            f"<= {ISOLATION_LIMIT:.0%}",
            "slow delivered",
            "CPU s/1k msgs",
        ),
    )
    for v in verdicts:
        row: Throughput = v["row"]
        verdict = "" if v["pass"] is None else "PASS" if v["pass"] else "FAIL"
        cpu = row.details.get("cpu_s_per_1000", {}).get("this process")
        slow = v["slow_delivered_meanwhile"] if v["pass"] is not None else None
        table.add_row(
            str(v["variant"]),
            str(v["concurrency"]),
            f"{row.delivered:,}",
            f"{row.seconds:.2f}" if row.rate else "-",
            _rate(row),
            f"{v['ratio']:.0%}" if v["ratio"] is not None else "-",
            f"{v['slowdown']:.1%}" if v["slowdown"] is not None else "-",
            verdict,
            f"{slow:,}" if slow is not None else "-",
            f"{cpu:.2f}" if cpu is not None else "-",
        )
    return table


def _notes(console: Console, rows: list[Throughput]) -> None:
    """Each row's note under its table (too long for a column at a terminal's width)."""
    for row in rows:
        concurrency = f", c={_concurrency(row)}" if _concurrency(row) else ""
        console.print(f"  {_label(row)}{concurrency}: {row.note}", markup=False, highlight=False)


def profile_by_package(stats: dict[Any, Any]) -> list[tuple[str, float]]:
    """Own time (tottime) summed per top-level package, largest first (``pstats`` raw stats)."""
    totals: defaultdict[str, float] = defaultdict(float)
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.items():
        totals[_package(filename)] += tottime
    return sorted(totals.items(), key=lambda item: -item[1])


def _package(filename: str) -> str:
    if filename == "~":
        return "built-ins (C: sockets, select, hmac, ...)"
    path = Path(filename)
    for marker in ("site-packages", "main"):
        if marker in path.parts:
            rest = path.parts[path.parts.index(marker) + 1 :]
            return rest[0] if rest else filename
    return f"stdlib {path.parent.name}/" if path.parent.name != "python3.11" else "stdlib"


def show(
    console: Console, rows: list[Throughput], headline: str, profile: dict[str, Any] | None
) -> None:
    if any(_kind(r) != "isolation" for r in rows):
        console.print(drain_table(rows, headline))
        _notes(console, drain_rows(rows))
    table = isolation_table(rows)
    if table is not None:
        console.print(table)
        _notes(console, [v["row"] for v in isolation_verdicts(rows)])
    if profile:
        rate = profile["delivered"] / profile["seconds"]
        console.rule(
            f"cProfile of the relay draining, concurrency {profile['concurrency']}, "
            f"{profile['seconds']:.0f} s: {profile['delivered']:,} delivered "
            f"({rate:,.0f}/s under the profiler)"
        )
        total = sum(s for _, s in profile["by_package"]) or 1.0
        for package, seconds in profile["by_package"][:10]:
            console.print(f"  {seconds:7.2f} s  {seconds / total:5.1%}  {package}")
        console.print(profile["tottime"], markup=False, highlight=False)
        console.print(profile["cumtime"], markup=False, highlight=False)


def write_json(
    path: Path, document: dict[str, Any], rows: list[Throughput], profile: dict[str, Any] | None
) -> None:
    verdicts = [{k: v for k, v in d.items() if k != "row"} for d in isolation_verdicts(rows)]
    document = {
        **document,
        "goal_per_s": GOAL_PER_S,
        "isolation_limit": ISOLATION_LIMIT,
        "throughput": [r.to_json() for r in rows],
        "isolation": verdicts,
        "profile": profile,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


def plot(path: Path, rows: list[Throughput], headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6), gridspec_kw={"width_ratios": [3, 1]})
    _bars(left, [r for r in drain_rows(rows) if r.rate], "deliveries / s", "webhook drain")
    left.axhline(GOAL_PER_S, color="#e63946", linestyle="--", linewidth=1)
    left.annotate(
        f"goal {GOAL_PER_S:,}/s", (-0.4, GOAL_PER_S), color="#e63946", va="bottom", fontsize=8
    )
    isolated = [v["row"] for v in isolation_verdicts(rows) if v["row"].rate]
    _bars(right, isolated, "fast route deliveries / s", "fast route beside a slow one")
    fig.suptitle(headline)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax: Any, rows: list[Throughput], ylabel: str, title: str) -> None:
    names = ["\n".join(textwrap.wrap(_label(r), 18)) + f"\nc={_concurrency(r)}" for r in rows]
    colors = [
        {"relay": "#2a9d8f", "isolation": "#2a9d8f", "naive": "#8d99ae"}.get(_kind(r), "#457b9d")
        for r in rows
    ]
    bars = ax.bar(names, [r.rate for r in rows], color=colors)
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(
            f"{row.rate:,.0f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=7)
