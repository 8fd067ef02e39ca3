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
import uuid
from collections.abc import Callable, Sequence
from typing import NoReturn

import psycopg

import outbox_lib
from outbox_lib import ConfigurationError, InvalidMessageError, OutboxError

from . import __version__
from .config import OPTION_BY_NAME, Settings, argparse_type, load_settings
from .db import connect, redact
from .errors import one_line
from .logs import configure_logging

EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are a single line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"outbox-relay: error: {message}\n")


def _add_options(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    for name in names:
        option = OPTION_BY_NAME[name]
        default = f" (default: {option.default})" if option.default is not None else ""
        parser.add_argument(
            option.flag,
            dest=name,
            type=argparse_type(option),
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{option.help}{default}; env {option.env}",
        )


_COMMON = ("database_url", "schema", "log_level", "log_format")
_RUN = (
    "kafka_bootstrap_servers",
    "metrics_port",
    "batch_size",
    "lease_seconds",
    "hold_seconds",
    "poll_interval",
    "shutdown_grace",
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox-relay",
        description="Transactional outbox relay: PostgreSQL to Kafka, at least once, in order.",
    )
    parser.add_argument("--version", action="version", version=f"outbox-relay {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file; env OUTBOX_CONFIG")
    _add_options(common, _COMMON)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    commands.add_parser(
        "migrate",
        parents=[common],
        help="create or upgrade the outbox schema",
        description="Create or upgrade the outbox schema. Idempotent; safe from many processes.",
    )
    run = commands.add_parser(
        "run",
        parents=[common],
        help="run the relay",
        description="Deliver committed outbox messages until SIGTERM/SIGINT.",
    )
    _add_options(run, _RUN)
    status = commands.add_parser(
        "status",
        parents=[common],
        help="pending, dead-lettered and lag per topic; live relays and their buckets",
        description="Per topic: pending messages, dead letters and the oldest pending age. "
        "Then the live relays, each with the key buckets it holds and its last heartbeat.",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_dead_letters(commands, common)
    _add_routes(commands, common)
    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline on an embedded PostgreSQL and broker",
        description="Embedded PostgreSQL + Kafka-compatible broker, a sample order app, "
        "relays sharing the key buckets and draining it together, and a consumer proving "
        "what arrived (in per-key order across relays).",
    )
    demo.add_argument("--orders", type=_positive, default=2000, help="orders to write")
    demo.add_argument(
        "--relays",
        type=_positive,
        default=2,
        metavar="N",
        help="relays to run in-process, sharing the work by key bucket (default: 2)",
    )
    demo.add_argument("--workdir", default=None, help="where the embedded servers keep data")
    return parser


def _add_dead_letters(commands: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    group = commands.add_parser(
        "dead-letters",
        help="list or retry dead letters",
        description="Dead letters: messages a route gave up on (or whose topic matched no "
        "route), kept with a full copy of the message.",
    )
    actions = group.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="list dead letters, newest first",
        description="List dead letters, newest first.",
    )
    listing.add_argument("--topic", metavar="T", help="only dead letters of this outbox topic")
    listing.add_argument("--route", metavar="R", help="only dead letters of this route")
    listing.add_argument(
        "--limit", type=_positive, default=100, metavar="N", help="show at most N (default: 100)"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    retry = actions.add_parser(
        "retry",
        parents=[common],
        help="deliver dead letters again",
        description="Put dead letters back in the outbox, in one transaction, with the same "
        "message id and idempotency key. A letter of a route is delivered again to that route "
        "only; a 'no-route' letter is routed afresh with the relays' current routes.",
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=_uuid, metavar="ID", help="the dead letters of one message")
    which.add_argument("--topic", metavar="T", help="every dead letter of this outbox topic")
    which.add_argument("--all", action="store_true", help="every dead letter")
    retry.add_argument("--route", metavar="R", help="only dead letters of this route")


def _add_routes(commands: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    group = commands.add_parser(
        "routes",
        help="list, enable or disable routes",
        description="Routes and their state. A route is disabled by its endpoint (HTTP 410 "
        "Gone) or by an operator; relays deliver nothing to it until it is enabled again.",
    )
    actions = group.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="every route: state, pending and dead-lettered rows",
        description="Every route of the configuration or with rows in the database: its "
        "state, pending deliveries and dead letters.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    enable = actions.add_parser(
        "enable",
        parents=[common],
        help="enable a disabled route",
        description="Enable a route, e.g. one disabled after its endpoint answered 410. Dead "
        "letters stay dead: retry them with `dead-letters retry --route NAME --all`.",
    )
    enable.add_argument("name", type=_route_name, metavar="NAME", help="the route's name")
    disable = actions.add_parser(
        "disable",
        parents=[common],
        help="stop delivering to a route",
        description="Disable a route: relays stop delivering to it until it is enabled.",
    )
    disable.add_argument("name", type=_route_name, metavar="NAME", help="the route's name")
    disable.add_argument("--reason", metavar="TEXT", help="why, recorded with the state")


def _uuid(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a message id (a UUID), got {raw!r}") from None


def _route_name(raw: str) -> str:
    from .routestate import check_route_name

    try:
        return check_route_name(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {raw!r}")
    return value


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
            conn, settings.schema, topic=args.topic, route=args.route, limit=args.limit
        )
    print_page(page, as_json=args.json)
    return 0


def cmd_dead_letters_retry(args: argparse.Namespace, settings: Settings) -> int:
    from .deadletters import Selection, print_retried, retry_dead_letters

    selection = Selection(id=args.id, topic=args.topic, route=args.route)
    with connect(settings.require_database_url(), autocommit=True) as conn:
        retried = retry_dead_letters(conn, settings.schema, selection)
    print_retried(retried, {route.name for route in settings.effective_routes()})
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
    "routes list": cmd_routes_list,
    "routes enable": cmd_routes_enable,
    "routes disable": cmd_routes_disable,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_and_logging(args)
        return COMMANDS[_command_name(args)](args, settings)
    except (ConfigurationError, InvalidMessageError) as exc:
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
