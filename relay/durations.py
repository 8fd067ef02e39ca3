"""Parse human durations such as ``90s``, ``15m``, ``7d``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Return seconds; a bare number means seconds. Raises ``ValueError`` with the reason."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 15m, 12h, 7d)")
    return float(match[1]) * _SECONDS[match[2] or "s"]
