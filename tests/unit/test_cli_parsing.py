"""The command line's parsing and usage errors. Nothing here reaches a database."""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cli import main
from relay.logs import JsonFormatter

ROOT = Path(__file__).resolve().parents[2]

COMMANDS = ["migrate", "run", "status", "dead-letters", "routes", "replay", "purge", "demo"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OUTBOX_* variable from the caller's shell, and the root logger restored after
    main() configured it (its handler would otherwise outlive capsys's stream)."""
    for name in list(os.environ):
        if name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _exit_code(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    assert lines[0].startswith("outbox-relay"), lines[0]
    assert "error: " in lines[0]
    return lines[0]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([command, "--help"]) == 0
    assert f"usage: outbox-relay {command}" in capsys.readouterr().out


def test_run_help_shows_flags_with_their_environment_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _exit_code(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag, env in [
        ("--database-url", "OUTBOX_DATABASE_URL"),
        ("--schema", "OUTBOX_SCHEMA"),
        ("--kafka-bootstrap-servers", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS"),
        ("--metrics-port", "OUTBOX_METRICS_PORT"),
        ("--batch-size", "OUTBOX_BATCH_SIZE"),
        ("--config", "OUTBOX_CONFIG"),
    ]:
        assert flag in out and env in out


def test_version_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--version"]) == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["version"]
    assert capsys.readouterr().out == f"outbox-relay {version}\n"


@pytest.mark.parametrize(
    "argv", [["--bogus", "status"], ["run", "--bogus"], ["migrate", "--batch-size", "5"]]
)
def test_unknown_flag_exits_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("outbox-relay: error: unrecognized arguments:")


def test_missing_command_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([]) == 2
    assert "COMMAND" in _one_error_line(capsys)


def test_unknown_command_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["frobnicate"]) == 2
    assert "frobnicate" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["run", "--batch-size", "0"], "--batch-size"),
        (["run", "--batch-size", "many"], "--batch-size"),
        (["run", "--metrics-port", "99999"], "--metrics-port"),
        (["run", "--lease-seconds", "forever"], "--lease-seconds"),
        (["migrate", "--schema", "a-b"], "--schema"),
        (["status", "--log-format", "xml"], "--log-format"),
        (["demo", "--orders", "0"], "--orders"),
        (["dead-letters", "list", "--limit", "-1"], "--limit"),
        (["dead-letters", "retry", "--id", "7"], "--id"),
        (["dead-letters", "list", "--since", "soon"], "--since"),
        (["dead-letters", "discard", "--all", "--since", "x"], "--since"),
        (["replay", "--topic", "t", "--route", "r", "--until", "x"], "--until"),
        (["replay", "--topic", "t", "--route", ""], "--route"),
        (["purge", "--older-than", "0s"], "--older-than"),
        (["purge", "--older-than", "7d", "--batch-size", "-2"], "--batch-size"),
        (["routes", "disable", "no-route"], "NAME"),
    ],
)
def test_invalid_flag_value_exits_2_with_one_line(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(argv) == 2
    assert flag in _one_error_line(capsys)


def test_invalid_flag_value_line_gives_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["run", "--batch-size", "0"]) == 2
    assert "positive" in _one_error_line(capsys)


def test_migrate_without_database_url_exits_2_naming_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["migrate"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("outbox-relay: error: no database URL")
    assert "OUTBOX_DATABASE_URL" in line


def test_invalid_schema_in_environment_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OUTBOX_SCHEMA", "not-a-schema")
    assert main(["migrate"]) == 2
    line = _one_error_line(capsys)
    assert "OUTBOX_SCHEMA" in line and "not-a-schema" in line


def test_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"{tmp_path}/absent.toml"
    assert main(["status", "--config", missing]) == 2
    assert "absent.toml does not exist" in _one_error_line(capsys)


def test_invalid_log_level_in_environment_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OUTBOX_LOG_LEVEL", "chatty")
    assert main(["migrate"]) == 2
    assert "must be one of debug, info, warning, error" in _one_error_line(capsys)


def test_invalid_log_level_error_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OUTBOX_LOG_LEVEL", "chatty")
    assert main(["migrate"]) == 2
    assert "OUTBOX_LOG_LEVEL" in _one_error_line(capsys)


def test_log_format_flag_selects_json_logs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--log-format", "json", "--log-level", "warning"]) == 2
    capsys.readouterr()
    root = logging.getLogger()
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    assert root.level == logging.WARNING


@pytest.mark.parametrize("source", ["env", "toml"])
def test_log_format_from_env_or_file_selects_json_logs(
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if source == "env":
        monkeypatch.setenv("OUTBOX_LOG_FORMAT", "json")
    else:
        config = tmp_path / "relay.toml"
        config.write_text('log_format = "json"\n', encoding="utf-8")
        monkeypatch.setenv("OUTBOX_CONFIG", str(config))
    assert main(["migrate"]) == 2  # no database URL: stops before any connection
    capsys.readouterr()
    assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
