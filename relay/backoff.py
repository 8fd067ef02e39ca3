"""Retry delays: exponential with jitter, from tenacity's wait strategies."""

from __future__ import annotations

from dataclasses import dataclass, field

from tenacity import RetryCallState, wait_exponential, wait_random
from tenacity.wait import wait_base


@dataclass(frozen=True)
class Backoff:
    """``delay(n)``: the wait after attempt ``n``, ``initial * 2**(n-1)`` plus jitter, capped."""

    initial: float
    maximum: float
    jitter: float | None = None
    _wait: wait_base = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        jitter = self.initial if self.jitter is None else self.jitter
        wait = wait_exponential(multiplier=self.initial, max=self.maximum) + wait_random(0, jitter)
        object.__setattr__(self, "_wait", wait)

    @property
    def delay_strategy(self) -> wait_base:
        """The same schedule as a tenacity ``wait=`` argument."""
        return self._wait

    def delay(self, attempt: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = max(1, attempt)
        return min(float(self._wait(state)), self.maximum)
