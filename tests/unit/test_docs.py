"""The README's configuration table is checked against the settings it documents."""

from __future__ import annotations

from pathlib import Path

from relay.config import OPTIONS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_option_with_its_flag_and_variable() -> None:
    text = README.read_text("utf-8")
    for option in OPTIONS:
        assert f"| `{option.flag}` | `{option.env}` |" in text, option.name


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text("utf-8")
    assert "make demo" in text and "make test" in text
