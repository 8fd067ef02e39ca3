"""``outbox-relay``: the command line.

Exit codes: 0 success; 1 a runtime failure (database unreachable, migration failed);
2 bad input (unknown flag, invalid value, invalid configuration). Errors are one line on
stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import psycopg

import outbox_lib
from outbox_lib import ConfigurationError, InvalidMessageError, OutboxError

from .cli_parser import EXIT_USAGE, Duration, build_parser
from .config import OPTION_BY_NAME, Settings, load_settings
from .db import connect, redact
from .errors import UsageError, one_line
from .logs import configure_logging

if TYPE_CHECKING:
    from .deadletters import Selection

EXIT_FAILURE = 1


def _settings(args: argparse.Namespace) -> Settings:
    flags = {k: v for k, v in vars(args).items() if k in OPTION_BY_NAME}
    return load_settings(flags, os.environ, getattr(args, "config", None))


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.require_database_url()
    with connect(url, autocommit=True) as conn:
        applied = outbox_lib.migrate(conn, settings.schema)
    if applied:
        print(f"schema {settings.schema}: applied {', '.join(map(str, applied))}")
    else:
        print(f"schema {settings.schema}: up to date")
    logging.getLogger(__name__).info("migrated %s", redact(url))
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from .app import run_relay

    asyncio.run(run_relay(settings))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from .status import print_status, read_status

    with connect(settings.require_database_url(), autocommit=True) as conn:
        report = read_status(conn, settings.schema)
    print_status(report, as_json=args.json)
    return 0


def cmd_dead_letters_list(args: argparse.Namespace, settings: Settings) -> int:
    from .deadletters import list_dead_letters, print_page

    with connect(settings.require_database_url(), autocommit=True) as conn:
        page = list_dead_letters(
            conn, settings.schema, _selection(args), limit=args.limit, discarded=args.discarded
        )
    print_page(page, as_json=args.json, discarded=args.discarded)
    return 0


def cmd_dead_letters_retry(args: argparse.Namespace, settings: Settings) -> int:
    from .deadletters import preview, print_retried, retry_dead_letters

    with connect(settings.require_database_url(), autocommit=True) as conn:
        if args.dry_run:
            retried = preview(conn, settings.schema, _selection(args)).counted
        else:
            retried = retry_dead_letters(conn, settings.schema, _selection(args))
    print_retried(retried, _configured(settings), dry_run=args.dry_run)
    return 0


def cmd_dead_letters_discard(args: argparse.Namespace, settings: Settings) -> int:
    from .deadletters import Discarded, discard_dead_letters, preview, print_discarded

    if not (args.yes or args.dry_run or sys.stdin.isatty()):
        raise UsageError("discard needs confirmation: stdin is not a terminal; pass --yes")
    with connect(settings.require_database_url(), autocommit=True) as conn:
        counted = preview(conn, settings.schema, _selection(args))
        letters = counted.counted.letters
        if args.dry_run or not letters:
            print_discarded(Discarded(counted.counted.per_route), dry_run=True)
            return 0
        if not (args.yes or _confirm(f"Discard {letters} dead letters? [y/N] ")):
            print("nothing discarded", file=sys.stderr)
            return EXIT_FAILURE
        discarded = discard_dead_letters(conn, settings.schema, counted.selection, args.reason)
    print_discarded(discarded)
    return 0


def _selection(args: argparse.Namespace) -> Selection:
    from .deadletters import Selection

    return Selection(id=args.id, topic=args.topic, route=args.route, since=args.since)


def _configured(settings: Settings) -> set[str]:
    return {route.name for route in settings.effective_routes()}


def _confirm(question: str) -> bool:
    print(question, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in {"y", "yes"}


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from .moments import local_time
    from .replay import Replay, parse_key, print_replayed, replay

    since, until = args.since, args.until
    if since is not None and until is not None and local_time(since) > local_time(until):
        raise UsageError("--since must not be after --until")
    key = None if args.key is None else parse_key(args.key)
    request = Replay(args.topic, args.route, args.since, args.until, key, args.limit)
    with connect(settings.require_database_url(), autocommit=True) as conn:
        replayed = replay(conn, settings.schema, request, dry_run=args.dry_run)
    print_replayed(request, replayed, _configured(settings), dry_run=args.dry_run)
    return 0


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    from .purge import Cutoffs, count_purgeable, print_progress, print_purged, purge

    older: Duration | None = args.older_than
    inbox: Duration | None = args.inbox_older_than
    if older is None and inbox is None:
        raise UsageError("purge needs --older-than, --inbox-older-than or both")
    cutoffs = Cutoffs(older and older.delta, inbox and inbox.delta)
    with connect(settings.require_database_url(), autocommit=True) as conn:
        if args.dry_run:
            purged = count_purgeable(conn, settings.schema, cutoffs)
        else:
            on_batch = print_progress if sys.stdout.isatty() else None
            purged = purge(
                conn, settings.schema, cutoffs, batch_size=args.batch_size, on_batch=on_batch
            )
    print_purged(purged, older and older.text, inbox and inbox.text, dry_run=args.dry_run)
    return 0


def cmd_routes_list(args: argparse.Namespace, settings: Settings) -> int:
    from .routestate import print_routes, read_routes, with_configured

    configured = settings.effective_routes()
    with connect(settings.require_database_url(), autocommit=True) as conn:
        routes = with_configured(read_routes(conn, settings.schema), configured)
    print_routes(routes, configured, as_json=args.json)
    return 0


def cmd_routes_enable(args: argparse.Namespace, settings: Settings) -> int:
    from .routestate import enable_route

    with connect(settings.require_database_url(), autocommit=True) as conn:
        changed = enable_route(conn, settings.schema, args.name)
    print(f"route {args.name} enabled" if changed else f"route {args.name} was not disabled")
    return 0


def cmd_routes_disable(args: argparse.Namespace, settings: Settings) -> int:
    from .routestate import disable_route

    with connect(settings.require_database_url(), autocommit=True) as conn:
        reason = disable_route(conn, settings.schema, args.name, args.reason)
    print(f"route {args.name} disabled ({reason})")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return run_demo(orders=args.orders, relays=args.relays, workdir=args.workdir)


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "status": cmd_status,
    "dead-letters list": cmd_dead_letters_list,
    "dead-letters retry": cmd_dead_letters_retry,
    "dead-letters discard": cmd_dead_letters_discard,
    "routes list": cmd_routes_list,
    "routes enable": cmd_routes_enable,
    "routes disable": cmd_routes_disable,
    "replay": cmd_replay,
    "purge": cmd_purge,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_and_logging(args)
        return COMMANDS[_command_name(args)](args, settings)
    except (ConfigurationError, InvalidMessageError, UsageError) as exc:
        return _fail(EXIT_USAGE, exc)
    except (OutboxError, psycopg.Error) as exc:
        return _fail(EXIT_FAILURE, exc)
    except KeyboardInterrupt:
        return 130


def _command_name(args: argparse.Namespace) -> str:
    """``"status"``, or ``"dead-letters list"`` for commands with an action."""
    action = getattr(args, "action", None)
    return f"{args.command} {action}" if action else str(args.command)


def _settings_and_logging(args: argparse.Namespace) -> Settings:
    """Build the settings once; logging follows their flags > env > file precedence.

    The demo configures itself (embedded services), so it reads no settings.
    """
    if args.command == "demo":
        configure_logging("WARNING", "text")
        return Settings()
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _fail(code: int, exc: BaseException) -> int:
    print(f"outbox-relay: error: {one_line(exc)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
