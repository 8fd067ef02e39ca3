"""Show the figures: rich tables on the terminal, ``results.json`` and ``bench.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .results import Latency, Throughput

FLOOR_MSG_S = 20_000
RELAY_PREFIX = "outbox-relay, batch"


def throughput_table(rows: list[Throughput], headline: str) -> Table:
    table = Table(title=f"Throughput: {headline}", title_justify="left")
    for name, justify in (("scenario", "left"), ("delivered", "right"), ("seconds", "right"),
                          ("msg/s", "right"), ("vs raw", "right"), ("floor 20k", "center"),
                          ("notes", "left")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=name == "scenario")  # type: ignore[arg-type]
    raw = next((r.rate for r in rows if r.scenario.startswith("raw") and r.rate), None)
    for row in rows:
        table.add_row(
            row.scenario, f"{row.delivered:,}" if row.rate else "-",
            f"{row.seconds:.2f}" if row.rate else "-", _rate(row),
            f"{row.rate / raw:.0%}" if row.rate and raw else "-", _floor(row), row.note,
        )  # fmt: skip
    return table


def _rate(row: Throughput) -> str:
    if row.rate is None:
        return row.status
    suffix = " (partial)" if row.status == "partial" else ""
    return f"{row.rate:,.0f}{suffix}"


def _floor(row: Throughput) -> str:
    if not row.scenario.startswith(RELAY_PREFIX):
        return ""
    return "pass" if (row.rate or 0) >= FLOOR_MSG_S and row.status == "ok" else "FAIL"


def latency_table(rows: list[Latency]) -> Table:
    table = Table(title="Latency: commit to consume", title_justify="left")
    for name in ("scenario", "measured", "received", "achieved msg/s", "p50 ms", "p95 ms",
                 "p99 ms", "max ms", "notes"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("scenario", "notes") else "right",
                         no_wrap=name != "notes")  # fmt: skip
    for row in rows:
        cuts = row.percentiles()
        table.add_row(
            row.scenario, f"{row.published:,}", f"{row.received:,}", f"{row.achieved_rate:,.0f}",
            *(f"{cuts[k]:.1f}" if cuts else "-" for k in ("p50", "p95", "p99", "max")), row.note,
        )  # fmt: skip
    return table


def phases_table(rows: list[Throughput]) -> Table | None:
    """Where the relay's drain time goes, per batch size (from per-call timers)."""
    relays = [r for r in rows if r.details.get("phases")]
    if not relays:
        return None
    table = Table(
        title="outbox-relay drain: time inside each call (claims overlap sends: shares can "
        "add up past 100%)", title_justify="left",
    )  # fmt: skip
    table.add_column("call", no_wrap=True)
    for row in relays:
        table.add_column(row.scenario.removeprefix("outbox-relay, "), justify="right")
    labels = list(dict.fromkeys(k for r in relays for k in r.details["phases"]))
    for label in labels:
        table.add_row(label, *(_phase_cell(r.details["phases"].get(label)) for r in relays))
    return table


def _phase_cell(phase: dict[str, float] | None) -> str:
    if not phase:
        return "-"
    return (f"{phase['seconds']:.2f} s = {phase['share_of_wall']:.0%} "
            f"({phase['calls']:.0f} x {phase['ms_per_call']:.1f} ms)")  # fmt: skip


def show(console: Console, throughput: list[Throughput], latency: list[Latency],
         headline: str) -> None:  # fmt: skip
    if throughput:
        console.print(throughput_table(throughput, headline))
        phases = phases_table(throughput)
        if phases is not None:
            console.print(phases)
    if latency:
        console.print(latency_table(latency))


def write_json(path: Path, meta: dict[str, Any], throughput: list[Throughput],
               latency: list[Latency]) -> None:  # fmt: skip
    document = {
        **meta,
        "floor_msg_per_s": FLOOR_MSG_S,
        "throughput": [r.to_json() for r in throughput],
        "latency": [_latency_json(r) for r in latency],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


def _latency_json(row: Latency) -> dict[str, Any]:
    data = row.to_json()
    data["samples_ms"] = [round(s, 3) for s in row.samples_ms]
    return data


def plot(path: Path, throughput: list[Throughput], latency: list[Latency], headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, cdf) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    _bars(bars, throughput)
    _cdf(cdf, latency)
    fig.suptitle(headline)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax: Any, rows: list[Throughput]) -> None:
    shown = [r for r in rows if r.rate]
    names = [r.scenario.replace(" (", "\n(") for r in shown]
    colors = ["#2a9d8f" if r.scenario.startswith(RELAY_PREFIX) else "#8d99ae" for r in shown]
    bars = ax.bar(names, [r.rate for r in shown], color=colors)
    for bar, row in zip(bars, shown, strict=True):
        label = f"{row.rate:,.0f}" + ("\n(partial)" if row.status == "partial" else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)  # fmt: skip
    ax.axhline(FLOOR_MSG_S, color="#e63946", linestyle="--", linewidth=1)
    ax.annotate("floor 20k msg/s", (len(shown) - 0.5, FLOOR_MSG_S), color="#e63946",
                ha="right", va="bottom", fontsize=8)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("messages / s (log scale)")
    ax.set_title("drain throughput")
    ax.tick_params(axis="x", labelsize=8)
    missing = [r for r in rows if not r.rate]
    if missing:
        text = "\n".join(f"{r.scenario}: {r.status} ({r.note})"[:110] for r in missing)
        ax.text(0.01, 0.99, text, transform=ax.transAxes, va="top", fontsize=7, color="#6c757d")


def _cdf(ax: Any, rows: list[Latency]) -> None:
    for row in rows:
        ordered = sorted(row.samples_ms)
        if not ordered:
            continue
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        cuts = row.percentiles()
        label = f"{row.scenario}\np50 {cuts['p50']:.1f} ms, p99 {cuts['p99']:.1f} ms"
        ax.plot(ordered, fractions, label=label, color="#2a9d8f")
        for key in ("p50", "p99"):
            ax.axvline(cuts[key], color="#adb5bd", linestyle=":", linewidth=1)
    ax.set_xlabel("commit to consume (ms)")
    ax.set_ylabel("fraction of messages")
    ax.set_ylim(0, 1.01)
    ax.set_title("latency CDF")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(loc="lower right", fontsize=8)
