"""Retry delays: exponential with jitter, from tenacity's wait strategies."""

from __future__ import annotations

from dataclasses import dataclass, field

from tenacity import RetryCallState, wait_exponential_jitter


@dataclass(frozen=True)
class Backoff:
    """``delay(n)``: the wait after attempt ``n``, ``initial * 2**(n-1)`` plus jitter, capped."""

    initial: float
    maximum: float
    jitter: float | None = None
    _wait: wait_exponential_jitter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        jitter = self.initial if self.jitter is None else self.jitter
        wait = wait_exponential_jitter(initial=self.initial, max=self.maximum, jitter=jitter)
        object.__setattr__(self, "_wait", wait)

    def delay(self, attempt: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = max(1, attempt)
        return min(float(self._wait(state)), self.maximum)
