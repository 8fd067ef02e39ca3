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
import sys
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
