"""What a scenario reports: a throughput figure or a latency distribution."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["ok", "partial", "unavailable", "failed"]


@dataclass
class Throughput:
    """Messages delivered (broker acknowledged) in ``seconds`` of wall time.

    ``partial`` means the run was capped before the backlog was drained; the rate is still
    what was measured, and ``note`` says how the rest was extrapolated.
    """

    scenario: str
    delivered: int
    seconds: float
    status: Status = "ok"
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        if self.status not in ("ok", "partial") or self.seconds <= 0:
            return None
        return self.delivered / self.seconds

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "msg_per_s": self.rate}


@dataclass
class Latency:
    """Commit-to-consume latency of messages published at a steady rate."""

    scenario: str
    target_rate: float
    achieved_rate: float
    published: int
    received: int
    samples_ms: list[float]
    status: Status = "ok"
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def percentiles(self) -> dict[str, float]:
        if not self.samples_ms:
            return {}
        ordered = sorted(self.samples_ms)
        cuts = statistics.quantiles(ordered, n=1000, method="inclusive")
        return {
            "p50": cuts[499],
            "p95": cuts[949],
            "p99": cuts[989],
            "max": ordered[-1],
            "mean": statistics.fmean(ordered),
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["percentiles_ms"] = self.percentiles()
        return data


def unavailable(scenario: str, why: str) -> Throughput:
    """A scenario that could not run here, and exactly why (never a made-up number)."""
    return Throughput(scenario, 0, 0.0, status="unavailable", note=why)


def failed(scenario: str, exc: BaseException) -> Throughput:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Throughput(scenario, 0, 0.0, status="failed", note=f"{type(exc).__name__}: {first}")


def median_of_runs(rows: list[Throughput]) -> list[Throughput]:
    """One row per scenario: the median run by rate, every run's rate in its note.

    Runs of one scenario are interleaved with the others', so slow first runs (a fresh
    cluster creating its WAL segments) and neighbours' bursts do not all land on one.
    """
    groups: dict[str, list[Throughput]] = {}
    for row in rows:
        groups.setdefault(row.scenario, []).append(row)
    return [_median(runs) for runs in groups.values()]


def _median(runs: list[Throughput]) -> Throughput:
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r.rate or 0.0)
    chosen = ordered[(len(ordered) - 1) // 2]
    rates = ", ".join(f"{r.rate or 0:,.0f}" + ("*" if "NOISY" in r.note else "") for r in runs)
    chosen.note += f"; median of {len(runs)} runs: {rates} msg/s" + (
        " (* = noisy)" if "*" in rates else ""
    )
    chosen.details["runs_msg_per_s"] = [r.rate for r in runs]
    return chosen
