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
PROCESSES = "relay_processes"  # in the details of a ``relays`` drain: how many relays shared it


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
            *(f"{cuts[k]:.1f}" if cuts else "-" for k in ("p50", "p95", "p99", "max")),
            row.note + _split(row),
        )  # fmt: skip
    return table


def _split(row: Latency) -> str:
    """Commit to the broker's acknowledgement, to the relay's produce call, and produce to
    arrival (p50 / p99 each)."""
    parts = {"commit to broker ack": "commit_to_broker_ms",
             "commit to produce": "commit_to_produce_ms",
             "produce to arrival": "produce_to_arrival_ms"}  # fmt: skip
    shown = [f"{label} p50/p99 {cuts['p50']:.1f}/{cuts['p99']:.1f} ms"
             for label, key in parts.items() if (cuts := row.details.get(key))]  # fmt: skip
    return "".join(f"; {part}" for part in shown)


def phases_table(rows: list[Throughput]) -> Table | None:
    """Where the relay's drain time goes, per batch size (from per-call timers)."""
    relays = [r for r in rows if r.details.get("phases")]
    if not relays:
        return None
    table = Table(
        title="outbox-relay drain: time inside each call (share of the drain's wall time)",
        title_justify="left",
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


def relays_table(rows: list[Throughput]) -> Table | None:
    """Relay processes sharing one database: rate per N, against one process and in-process."""
    shared = [r for r in rows if PROCESSES in r.details]
    if not shared:
        return None
    cpus = shared[0].details.get("cpus")
    table = Table(
        title=f"Relay processes sharing one database ({cpus} CPUs, shared with PostgreSQL and "
        "the broker)", title_justify="left",
    )  # fmt: skip
    for name in ("relays", "msg/s", "vs 1 process", "vs in-process", "buckets per relay",
                 "delivered per relay", "duplicates", "status"):  # fmt: skip
        table.add_column(name, justify="left" if name == "status" else "right", no_wrap=True)
    one = next((r.rate for r in shared if r.details[PROCESSES] == 1 and r.rate), None)
    for row in shared:
        inline = _in_process_rate(rows, row.details["batch_size"])
        split = row.details["delivered_per_relay"]
        table.add_row(
            str(row.details[PROCESSES]), _rate(row), _ratio(row.rate, one),
            _ratio(row.rate, inline), "/".join(map(str, row.details["buckets_per_relay"])),
            "/".join("?" if d is None else f"{d:,}" for d in split),
            str(row.details.get("duplicates", "-")), row.status,
        )  # fmt: skip
    return table


def _in_process_rate(rows: list[Throughput], batch_size: int) -> float | None:
    """The ``relay`` scenario's rate at this batch size (one relay, in the benchmark process)."""
    name = f"{RELAY_PREFIX} {batch_size}"
    return next((r.rate for r in rows if r.scenario == name and r.rate), None)


def _ratio(rate: float | None, base: float | None) -> str:
    return f"{rate / base:.0%}" if rate and base else "-"


def show(console: Console, throughput: list[Throughput], latency: list[Latency],
         headline: str) -> None:  # fmt: skip
    if throughput:
        console.print(throughput_table(throughput, headline))
        for table in (phases_table(throughput), relays_table(throughput)):
            if table is not None:
                console.print(table)
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

    shared = [r for r in throughput if PROCESSES in r.details and r.rate]
    ratios = [3, 2, 2] if shared else [3, 2]
    fig, axes = plt.subplots(1, len(ratios), figsize=(3 * sum(ratios), 6),
                             gridspec_kw={"width_ratios": ratios})  # fmt: skip
    _bars(axes[0], throughput)
    _cdf(axes[1], latency)
    if shared:
        _scaling(axes[2], shared, throughput)
    fig.suptitle(headline)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax: Any, rows: list[Throughput]) -> None:
    shown = [r for r in rows if r.rate]
    names = [r.scenario.replace(" (", "\n(").replace(", ", ",\n") for r in shown]
    colors = [_color(r) for r in shown]
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


def _color(row: Throughput) -> str:
    if row.scenario.startswith(RELAY_PREFIX):
        return "#2a9d8f"
    return "#457b9d" if PROCESSES in row.details else "#8d99ae"


def _scaling(ax: Any, shared: list[Throughput], rows: list[Throughput]) -> None:
    """msg/s per number of relay processes, the in-process relay as a line."""
    counts = [r.details[PROCESSES] for r in shared]
    bars = ax.bar([str(n) for n in counts], [r.rate for r in shared], color="#457b9d")
    for bar, row in zip(bars, shared, strict=True):
        ax.annotate(f"{row.rate:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)  # fmt: skip
    inline = _in_process_rate(rows, shared[0].details["batch_size"])
    if inline:
        ax.axhline(inline, color="#2a9d8f", linestyle="--", linewidth=1,
                   label=f"1 relay in-process: {inline:,.0f}")  # fmt: skip
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(0, 1.3 * max([r.rate or 0.0 for r in shared] + [inline or 0.0]))
    ax.set_xlabel("relay processes")
    ax.set_ylabel("messages / s")
    ax.set_title(f"relays sharing one database\n({shared[0].details.get('cpus')} CPUs in all, "
                 "with PostgreSQL and the broker)", fontsize=10)  # fmt: skip


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
