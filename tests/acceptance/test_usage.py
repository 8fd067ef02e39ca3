"""Bad input exits 2 with one line naming the problem; ``--help`` works everywhere
(CONTRACT sections 4 and 8)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.cli import error_lines, run_cli

pytestmark = pytest.mark.acceptance

# Points nowhere: every case below must be rejected before any connection is tried.
NO_DB = "postgresql://nobody@127.0.0.1:1/none"


def _assert_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    code, stderr = result.returncode, result.stderr
    assert code == 2, f"exit {code}, stderr: {stderr}"
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("outbox-relay: error: "), lines[0]
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("command", ["migrate", "run"])
def test_unknown_flag(command: str) -> None:
    result = run_cli(command, "--bogus-flag", env={"OUTBOX_DATABASE_URL": NO_DB})

    _assert_usage_error(result, "--bogus-flag")


def test_unknown_command() -> None:
    _assert_usage_error(run_cli("frobnicate"), "frobnicate")


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [("--batch-size", "0", "positive"), ("--metrics-port", "99999", "port")],
)
def test_bad_flag_value(flag: str, value: str, reason: str) -> None:
    result = run_cli("run", flag, value, env={"OUTBOX_DATABASE_URL": NO_DB})

    _assert_usage_error(result, flag, value, reason)


def test_bad_batch_size_in_environment() -> None:
    result = run_cli("run", env={"OUTBOX_DATABASE_URL": NO_DB, "OUTBOX_BATCH_SIZE": "abc"})

    _assert_usage_error(result, "OUTBOX_BATCH_SIZE", "abc")


CONFIGS = {
    "invalid_toml": ("[kafka\nbootstrap_servers = 'x'\n", ("TOML",)),
    "unknown_key": ("bogus_key = 1\n", ("bogus_key",)),
    "webhook_without_url": (
        '[[routes]]\nname = "billing-hook"\ntopics = ["orders.created"]\nsink = "webhook"\n',
        ("billing-hook", "url"),
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_file(case: str, tmp_config: Callable[..., Path]) -> None:
    text, needles = CONFIGS[case]
    path = str(tmp_config(text))
    env = {"OUTBOX_DATABASE_URL": NO_DB, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}

    result = run_cli("run", "--config", path, env=env)

    line = _assert_usage_error(result, *needles)
    if case != "webhook_without_url":
        assert path in line, "the message names the file"


def test_bad_config_file_named_by_environment(tmp_config: Callable[..., Path]) -> None:
    path = str(tmp_config(CONFIGS["unknown_key"][0]))

    result = run_cli("migrate", env={"OUTBOX_DATABASE_URL": NO_DB, "OUTBOX_CONFIG": path})

    _assert_usage_error(result, path, "bogus_key")


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")

    result = run_cli("migrate", "--config", path, env={"OUTBOX_DATABASE_URL": NO_DB})

    _assert_usage_error(result, path)


HELP = {
    (): ("migrate", "run", "status", "dead-letters", "routes", "replay", "purge"),
    ("migrate",): ("--database-url", "--schema", "--config"),
    ("run",): (
        "--database-url", "--schema", "--config", "--kafka-bootstrap-servers",
        "--metrics-port", "--batch-size", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS",
    ),
    ("status",): ("--database-url", "--schema", "--json"),
    ("demo",): ("--orders",),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(HELP), ids=lambda c: " ".join(c) or "top")
def test_help(command: tuple[str, ...]) -> None:
    result = run_cli(*command, "--help")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "usage: outbox-relay" in result.stdout
    for flag in HELP[command]:
        assert flag in result.stdout, f"{flag} missing from `{' '.join(command)} --help`"


OPERATOR_HELP = {
    ("dead-letters",): ("list", "retry", "discard"),
    ("dead-letters", "list"): (
        "--id",
        "--topic",
        "--route",
        "--since",
        "--discarded",
        "--limit",
        "--json",
        "--database-url",
    ),
    ("dead-letters", "retry"): (
        "--id",
        "--topic",
        "--all",
        "--route",
        "--since",
        "--dry-run",
        "--database-url",
    ),
    ("dead-letters", "discard"): (
        "--id",
        "--topic",
        "--all",
        "--route",
        "--since",
        "--reason",
        "--dry-run",
        "--yes",
    ),
    ("replay",): (
        "--topic",
        "--route",
        "--since",
        "--until",
        "--key",
        "--limit",
        "--dry-run",
        "--database-url",
    ),
    ("purge",): ("--older-than", "--batch-size", "--dry-run", "--database-url"),
    ("routes",): ("list", "enable", "disable"),
    ("routes", "list"): ("--json", "--config"),
    ("routes", "enable"): ("NAME",),
    ("routes", "disable"): ("NAME", "--reason"),
}


@pytest.mark.parametrize("command", sorted(OPERATOR_HELP), ids=" ".join)
def test_help_of_operator_commands(command: tuple[str, ...]) -> None:
    result = run_cli(*command, "--help")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"usage: outbox-relay {' '.join(command)}" in result.stdout
    for flag in OPERATOR_HELP[command]:
        assert flag in result.stdout, f"{flag} missing from `{' '.join(command)} --help`"


# The command line (split on spaces), then what the one error line must name.
OPERATOR_BAD_INPUT = {
    "dead-letters": ("ACTION",),
    "dead-letters list --bogus-flag": ("--bogus-flag",),
    "dead-letters list --limit 0": ("--limit", "'0'", "positive"),
    "dead-letters list --limit many": ("--limit", "'many'"),
    "dead-letters retry": ("--id", "--topic", "--all"),
    "dead-letters retry --id not-a-uuid": ("--id", "'not-a-uuid'", "UUID"),
    "dead-letters retry --all --topic t": ("--topic", "--all"),
    "dead-letters retry --all --bogus-flag": ("--bogus-flag",),
    "dead-letters list --since yesterday": ("--since", "'yesterday'"),
    "dead-letters list --id 7": ("--id", "'7'", "UUID"),
    "dead-letters retry --all --since 5parsecs": ("--since", "'5parsecs'"),
    "dead-letters discard": ("--id", "--topic", "--all"),
    "dead-letters discard --all --topic t": ("--topic", "--all"),
    "dead-letters discard --id nope": ("--id", "'nope'", "UUID"),
    "dead-letters discard --all --since soon": ("--since", "'soon'"),
    "dead-letters discard --all --bogus-flag": ("--bogus-flag",),
    "dead-letters discard --all": ("confirmation", "--yes"),
    "replay": ("--topic", "--route"),
    "replay --topic t": ("--route",),
    "replay --route r": ("--topic",),
    "replay --topic t --route r --since later": ("--since", "'later'"),
    "replay --topic t --route r --until never": ("--until", "'never'"),
    "replay --topic t --route r --limit 0": ("--limit", "'0'", "positive"),
    "replay --topic t --route r --since 1h --until 2h": ("--since", "--until"),
    "replay --topic t --route r --since 2026-11-21T10:00Z --until 2026-11-20": (
        "--since",
        "--until",
    ),
    "replay --topic t --route r --bogus-flag": ("--bogus-flag",),
    "purge": ("--older-than",),
    "purge --older-than 0": ("--older-than", "'0'"),
    "purge --older-than 0d": ("--older-than", "'0d'"),
    "purge --older-than week": ("--older-than", "'week'"),
    "purge --older-than 7d --batch-size 0": ("--batch-size", "'0'", "positive"),
    "purge --older-than 7d --bogus-flag": ("--bogus-flag",),
    "routes list --bogus-flag": ("--bogus-flag",),
    "routes enable": ("NAME",),
    "routes disable no-route": ("no-route",),
}


@pytest.mark.parametrize("command", sorted(OPERATOR_BAD_INPUT))
def test_operator_commands_reject_bad_input(command: str) -> None:
    result = run_cli(*command.split(), env={"OUTBOX_DATABASE_URL": NO_DB})

    _assert_usage_error(result, *OPERATOR_BAD_INPUT[command])


def test_help_of_purge() -> None:
    result = run_cli("purge", "--help")

    assert result.returncode == 0, result.stderr
    assert "--older-than" in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        "status",
        "dead-letters list --since 1h",
        "dead-letters retry --all --dry-run",
        "dead-letters discard --all --yes",
        "replay --topic t --route r --since 1h",
        "purge --older-than 7d",
    ],
)
def test_operator_commands_on_an_unreachable_database_exit_1_with_one_line(command: str) -> None:
    result = run_cli(*command.split(), env={"OUTBOX_DATABASE_URL": NO_DB})

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    [line] = error_lines(result.stderr)
    assert line.startswith("outbox-relay: error: cannot connect to the database"), line
    assert "Traceback" not in result.stderr
