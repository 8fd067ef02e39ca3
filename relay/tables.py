"""Rich tables for the operator commands.

Cells are plain text, never console markup (an error text such as ``[Errno 111]`` must show
as written). Output that is not a terminal is not wrapped to 80 columns, so each row stays
on one line for ``grep`` and ``less -S``.
"""

from __future__ import annotations

import datetime as dt
import sys

from rich.console import Console
from rich.text import Text

_UNWRAPPED = 1000


def console() -> Console:
    """A console for stdout: the terminal's width, or unwrapped when piped."""
    return Console() if sys.stdout.isatty() else Console(width=_UNWRAPPED)


def cell(value: object, style: str = "") -> Text:
    """``value`` as literal text; ``None`` as ``-``."""
    return Text("-" if value is None else str(value), style=style)


def when(value: dt.datetime | None) -> str:
    """A timestamp to the second, e.g. ``2026-11-21 10:00:00+00:00``."""
    return "-" if value is None else value.isoformat(sep=" ", timespec="seconds")


def shorten(text: str | None, width: int = 80) -> str | None:
    """One line of at most ``width`` characters, ``…`` marking a cut."""
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
