"""Which code a benchmark measured: the commit, the relay/library files that differ from it,
and a fingerprint of their contents (to notice them changing during a long run)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MEASURED = ("relay", "outbox_lib", "migrations")


def code_version() -> dict[str, Any]:
    """The commit measured, and which relay/library files differed from it (read-only git)."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run([*git, "status", "--porcelain", "--", *MEASURED],
                                capture_output=True, text=True, timeout=10,
                                check=True).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"fingerprint": fingerprint()}
    return {"commit": commit, "uncommitted": [line[3:] for line in status],
            "fingerprint": fingerprint()}  # fmt: skip


def fingerprint() -> str:
    """sha256 (12 hex digits) of every .py and .sql file of the measured packages."""
    digest = hashlib.sha256()
    for folder in MEASURED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".sql"):
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
