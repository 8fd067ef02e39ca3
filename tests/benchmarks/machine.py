"""How busy the machine was during a scenario, and how much of that was someone else.

A benchmark on a shared 2-core box is only as good as its quiet: a test suite running next
to it halves the figures. Each scenario therefore reports the cores used by the benchmark
(this process and its children, the embedded PostgreSQL and broker) and by everything else.
Services given with ``--database-url`` / ``--kafka`` on this machine count as "other".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True, slots=True)
class Load:
    wall_s: float
    bench_cores: float
    other_cores: float
    steal_cores: float  # taken by the hypervisor for other VMs: invisible as processes

    def describe(self) -> str:
        return (
            f"bench {self.bench_cores:.2f} cores, other processes {self.other_cores:.2f} "
            f"cores, stolen by the hypervisor {self.steal_cores:.2f} cores"
        )


class CpuWatch:
    """``start()`` then ``stop()``: the cores used in between, ours and others'."""

    def __init__(self, service_pids: Iterable[int | None]) -> None:
        self._roots = [psutil.Process(), *_processes(service_pids)]
        self._began = (0.0, 0.0, 0.0, 0.0)

    def start(self) -> None:
        self._began = (time.perf_counter(), _busy_seconds(), self._our_seconds(), _steal())

    def stop(self) -> Load:
        wall = time.perf_counter() - self._began[0]
        busy = _busy_seconds() - self._began[1]
        ours = self._our_seconds() - self._began[2]
        steal = _steal() - self._began[3]
        return Load(wall, ours / wall, max(0.0, busy - ours) / wall, steal / wall)

    def others_now(self, sample: float = 1.0) -> float:
        """Cores other processes are using right now (sampled over ``sample`` seconds)."""
        self.start()
        time.sleep(sample)
        return self.stop().other_cores

    def wait_for_quiet(self, cores: float, timeout: float) -> float:
        """Wait (up to ``timeout`` s) until others use at most ``cores``; returns their use."""
        deadline = time.monotonic() + timeout
        others = self.others_now()
        while others > cores and time.monotonic() < deadline:
            others = self.others_now()
        return others

    def _our_seconds(self) -> float:
        return sum(tree_seconds(root) for root in self._roots)


def tree_seconds(root: psutil.Process) -> float:
    """CPU of ``root`` (exited children included once reaped) plus its live descendants: a
    postmaster's figure covers every backend, live or gone."""
    total = _seconds(root, with_reaped=True)
    return total + sum(_seconds(child, with_reaped=False) for child in _children(root))


def _processes(pids: Iterable[int | None]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(pid))
    return found


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return list(process.children(recursive=True))
    except psutil.Error:
        return []


def _seconds(process: psutil.Process, *, with_reaped: bool) -> float:
    try:
        times: Any = process.cpu_times()
    except psutil.Error:
        return 0.0
    spent = float(times.user + times.system)
    if with_reaped:
        spent += float(times.children_user + times.children_system)
    return spent


def _busy_seconds() -> float:
    times: Any = psutil.cpu_times()
    return float(sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq")))


def _steal() -> float:
    return float(getattr(psutil.cpu_times(), "steal", 0.0))
