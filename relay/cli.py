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
from typing import NoReturn

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


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return run_demo(orders=args.orders, relays=args.relays, workdir=args.workdir)


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "status": cmd_status,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_and_logging(args)
        return COMMANDS[args.command](args, settings)
    except (ConfigurationError, InvalidMessageError) as exc:
        return _fail(EXIT_USAGE, exc)
    except OutboxError as exc:
        return _fail(EXIT_FAILURE, exc)
    except KeyboardInterrupt:
        return 130


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
