"""Pure parts of the operator commands: how keys, errors and retry outcomes are shown."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from relay.deadletters import (
    DeadLetter,
    Discarded,
    Page,
    Retried,
    print_discarded,
    print_page,
    print_retried,
    show_key,
)
from relay.replay import Replay, Replayed, parse_key, print_replayed
from relay.routestate import check_route_name
from relay.tables import shorten, when

AT = dt.datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=dt.UTC)


def _letter(**changes: object) -> DeadLetter:
    fields: dict[str, object] = {
        "id": uuid.UUID(int=7), "route": "billing-hook", "topic": "orders.created",
        "key": b"7", "attempts": 12, "last_status": "HTTP 503",
        "reason": "max attempts reached (HTTP 503)", "last_error": "HTTP 503: unavailable",
        "dead_at": AT, "created_at": AT - dt.timedelta(hours=1), "idempotency_key": "order-7",
    }  # fmt: skip
    fields.update(changes)
    return DeadLetter(**fields)  # type: ignore[arg-type]


def test_keys_are_text_or_postgres_hex() -> None:
    assert show_key(None) is None
    assert show_key(b"order-7") == "order-7"
    assert show_key("ключ".encode()) == "ключ"
    assert show_key(b"\x00\xff") == "\\x00ff"


def test_shorten_keeps_one_line_of_at_most_80_characters() -> None:
    assert shorten(None) is None
    assert shorten("HTTP 503:\n  upstream down") == "HTTP 503: upstream down"
    long = shorten("x" * 200)
    assert long is not None and len(long) == 80 and long.endswith("…")


def test_when_is_to_the_second() -> None:
    assert when(AT) == "2026-11-21 10:00:00+00:00"
    assert when(None) == "-"


def test_dead_letter_json_has_every_field() -> None:
    assert _letter(key=None).to_json() == {
        "id": "00000000-0000-0000-0000-000000000007",
        "route": "billing-hook",
        "topic": "orders.created",
        "key": None,
        "attempts": 12,
        "last_status": "HTTP 503",
        "reason": "max attempts reached (HTTP 503)",
        "last_error": "HTTP 503: unavailable",
        "dead_at": "2026-11-21T10:00:00.123456+00:00",
        "created_at": "2026-11-21T09:00:00.123456+00:00",
        "idempotency_key": "order-7",
    }


def test_print_page(capsys: pytest.CaptureFixture[str]) -> None:
    print_page(Page([], 0), as_json=True)
    assert json.loads(capsys.readouterr().out) == []
    print_page(Page([], 0), as_json=False)
    assert capsys.readouterr().out == "(no dead letters)\n"
    print_page(Page([_letter(last_error="[Errno 111] refused")], 3), as_json=False)
    out = capsys.readouterr().out
    assert "[Errno 111] refused" in out, "cells are text, not console markup"
    assert out.splitlines()[-1] == "showing 1 of 3; use --limit"


def test_print_retried(capsys: pytest.CaptureFixture[str]) -> None:
    print_retried(Retried())
    assert capsys.readouterr().out == "no dead letters to retry\n"

    retried = Retried({"billing-hook": 2, "no-route": 1}, 2, {"billing-hook": "gone"})
    print_retried(retried, configured={"orders"})
    captured = capsys.readouterr()
    assert captured.out == (
        "retried 3 dead letter(s) as 2 message(s) (billing-hook: 2, no-route: 1)\n"
    )
    assert captured.err.splitlines() == [
        "warning: route billing-hook is disabled; run `outbox-relay routes enable "
        "billing-hook` or its messages will be dead-lettered again",
        "warning: route billing-hook is not in the loaded configuration; its retried "
        "messages wait until a relay that has this route runs",
    ]


@pytest.mark.parametrize("name", ["no-route", "", "  "])
def test_route_names_that_cannot_be_enabled_or_disabled(name: str) -> None:
    with pytest.raises(ValueError, match="route"):
        check_route_name(name)


def test_a_discarded_letter_adds_when_and_why_to_its_json() -> None:
    document = _letter(discarded_at=AT, discarded_reason="duplicate").to_json()
    assert document == _letter().to_json() | {
        "discarded_at": "2026-11-21T10:00:00.123456+00:00",
        "discarded_reason": "duplicate",
    }


def test_print_discarded_page(capsys: pytest.CaptureFixture[str]) -> None:
    print_page(Page([], 0), as_json=False, discarded=True)
    assert capsys.readouterr().out == "(no discarded dead letters)\n"
    print_page(Page([_letter(discarded_at=AT, discarded_reason="dup")], 1), as_json=False,
               discarded=True)  # fmt: skip
    out = capsys.readouterr().out
    assert "discarded dead letters (newest first)" in out
    assert "discarded at" in out and "dup" in out


def test_print_retried_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    print_retried(Retried({"billing-hook": 2}, 1), dry_run=True)
    assert (
        capsys.readouterr().out
        == "would retry 2 dead letter(s) as 1 message(s) (billing-hook: 2)\n"
    )


def test_print_discarded(capsys: pytest.CaptureFixture[str]) -> None:
    print_discarded(Discarded())
    assert capsys.readouterr().out == "no dead letters to discard\n"
    print_discarded(Discarded({"a": 1, "b": 2}), dry_run=True)
    assert capsys.readouterr().out == "would discard 3 dead letter(s) (a: 1, b: 2)\n"
    print_discarded(Discarded({"a": 1}))
    assert capsys.readouterr().out == "discarded 1 dead letter(s) (a: 1)\n"


def test_keys_given_to_replay_read_like_dead_letters_list_shows_them() -> None:
    for key in (b"order-7", "ключ".encode(), b"\x00\xff"):
        shown = show_key(key)
        assert shown is not None and parse_key(shown) == key
    assert parse_key("\\xnot-hex") == b"\\xnot-hex", "not hex: the text itself"


def test_print_replayed(capsys: pytest.CaptureFixture[str]) -> None:
    request = Replay("orders.created", "billing-hook")
    print_replayed(request, Replayed(0), configured={"other"})
    captured = capsys.readouterr()
    assert captured.out == "replayed 0 message(s) of topic orders.created to route billing-hook\n"
    assert captured.err == "", "nothing replayed: nothing to warn about"

    print_replayed(request, Replayed(3, "endpoint gone"), configured={"other"}, dry_run=True)
    captured = capsys.readouterr()
    assert captured.out == (
        "would replay 3 message(s) of topic orders.created to route billing-hook\n"
    )
    assert captured.err.splitlines() == [
        "warning: route billing-hook is disabled (endpoint gone); run `outbox-relay routes "
        "enable billing-hook` or its messages will be dead-lettered",
        "warning: route billing-hook is not in the loaded configuration; its replayed "
        "messages wait until a relay that has this route runs",
    ]
    print_replayed(request, Replayed(1), configured=())
    assert capsys.readouterr().err == "", "no configuration loaded: no warning"
