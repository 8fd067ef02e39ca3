"""Logging set-up: human-readable text, or one JSON object per line.

JSON lines carry ``ts``, ``level``, ``logger``, ``message``, the relay's id once it has one
(``relay_id``), any ``extra=`` fields a call adds, and ``exception`` for tracebacks. Nothing
logged anywhere includes a secret: database URLs are redacted (:func:`relay.db.redact`) and
webhook secrets never leave :mod:`outbox_lib._signature`.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat("T", "milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


# The relay whose task is logging: set by run_relay, inherited by the tasks and worker
# threads it starts (so several relays in one process, as in the demo, each log their own).
_RELAY_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("relay_id", default=None)


class _RelayTag(logging.Filter):
    """Adds ``relay_id`` to every record logged on behalf of a relay."""

    def filter(self, record: logging.LogRecord) -> bool:
        relay_id = _RELAY_ID.get()
        if relay_id is not None and not hasattr(record, "relay_id"):
            record.relay_id = relay_id
        return True


_TAG = _RelayTag()


def tag_relay(relay_id: str) -> None:
    """From now on, records logged in this context (the relay's task and what it starts)
    name the relay (JSON: ``relay_id``)."""
    _RELAY_ID.set(relay_id)


def configure_logging(level: str, fmt: str) -> None:
    """Configure the root logger once, at the edge (the CLI), from validated settings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TAG)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: thousands of lines a second from a busy webhook lane.
    # The relay logs the outcomes that matter (dead letters, disabled routes, outages) itself.
    for noisy in ("psycopg.pool", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class RepeatQuieter:
    """What librdkafka logs, forwarded to ``logger`` without its repetitions.

    A broker that refuses connections makes librdkafka log the same failure many times a
    second. Each kind of line (its level and text, numbers aside) is forwarded the first time;
    repeats within ``every`` seconds are counted instead, and the next one after that is
    forwarded with how many were left out, so a lasting outage reads as one line a minute
    and a new kind of line (a state change) shows at once. Pass it as a client's ``logger``.
    """

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._every = every
        self._clock = clock
        self._seen: dict[tuple[int, str], tuple[float, int]] = {}  # kind -> (shown at, left out)

    def log(self, level: int, msg: str, *args: object) -> None:
        text = msg % args if args else msg
        kind = (level, _NUMBERS.sub("#", text))
        now = self._clock()
        shown_at, left_out = self._seen.get(kind, (-math.inf, 0))
        if now - shown_at < self._every:
            self._seen[kind] = (shown_at, left_out + 1)
            return
        if left_out:
            text += f" ({left_out} more like it in the last {now - shown_at:.0f} s)"
        self._seen[kind] = (now, 0)
        self._logger.log(level, "%s", text)


_NUMBERS = re.compile(r"\d+")
