"""Flags beat environment beat the TOML file (CONTRACT section 4).

``--batch-size`` has no outcome visible from outside the process (claims are not logged
and a batch leaves no trace in the tables), so precedence is shown on settings whose effect
is observable: ``schema`` (which schema ``migrate`` creates) and ``database_url`` (which
server a command reaches).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.cli import query, run_cli

pytestmark = pytest.mark.acceptance

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"


def _outbox_schemas(database_url: str) -> set[str]:
    rows = query(
        database_url,
        "SELECT table_schema FROM information_schema.tables WHERE table_name = 'schema_migrations'",
    )
    return {row[0] for row in rows}


def test_schema_flag_beats_environment_and_file(
    database_url: str, tmp_config: Callable[..., Path]
) -> None:
    config = tmp_config('schema = "s3"\n')
    env = {"OUTBOX_DATABASE_URL": database_url, "OUTBOX_SCHEMA": "s2", "OUTBOX_CONFIG": str(config)}

    result = run_cli("migrate", "--schema", "s1", env=env)

    assert result.returncode == 0, result.stderr
    assert _outbox_schemas(database_url) == {"s1"}


def test_schema_environment_beats_file(database_url: str, tmp_config: Callable[..., Path]) -> None:
    config = tmp_config('schema = "s3"\n')
    env = {"OUTBOX_DATABASE_URL": database_url, "OUTBOX_SCHEMA": "s2"}

    result = run_cli("migrate", "--config", str(config), env=env)

    assert result.returncode == 0, result.stderr
    assert _outbox_schemas(database_url) == {"s2"}


def test_schema_from_file_beats_default(database_url: str, tmp_config: Callable[..., Path]) -> None:
    config = tmp_config('schema = "s3"\n')

    result = run_cli("migrate", "--config", str(config), env={"OUTBOX_DATABASE_URL": database_url})

    assert result.returncode == 0, result.stderr
    assert _outbox_schemas(database_url) == {"s3"}


def test_database_url_flag_beats_environment_beats_file(
    database_url: str, tmp_config: Callable[..., Path]
) -> None:
    config = tmp_config(f'database_url = "{UNREACHABLE}"\nschema = "from_file"\n')

    env_wins = run_cli(
        "migrate", "--config", str(config), env={"OUTBOX_DATABASE_URL": database_url}
    )
    flag_wins = run_cli(
        "migrate", "--config", str(config), "--database-url", database_url,
        "--schema", "from_flag", env={"OUTBOX_DATABASE_URL": UNREACHABLE},
    )  # fmt: skip

    assert env_wins.returncode == 0, env_wins.stderr
    assert flag_wins.returncode == 0, flag_wins.stderr
    assert _outbox_schemas(database_url) == {"from_file", "from_flag"}
