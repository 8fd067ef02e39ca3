"""The ``outbox-relay`` argument parser: every command, flag and value check.

Values are checked here, so a wrong flag or value exits 2 with one line before anything
connects anywhere; :mod:`relay.cli` runs the commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, NoReturn, TypeVar

from . import __version__
from .config import OPTION_BY_NAME, argparse_type

if TYPE_CHECKING:
    from .moments import When

EXIT_USAGE = 2
T = TypeVar("T")


class Duration(NamedTuple):
    """A duration as given on the command line (for messages) and as a timedelta."""

    text: str
    delta: dt.timedelta


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
    "metrics_refresh_seconds",
    "batch_size",
    "lease_seconds",
    "hold_seconds",
    "poll_interval",
    "bucket_lease_seconds",
    "heartbeat_seconds",
    "shutdown_grace",
    "otel_spans",
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
    _add_replay_and_purge(commands, common)
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
        help="list, retry or discard dead letters",
        description="Dead letters: messages a route gave up on (or whose topic matched no "
        "route), kept with a full copy of the message. A discarded dead letter is kept for "
        "audit (until `purge`) but no longer counts, lists or retries as one.",
    )
    actions = group.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="list dead letters, newest first",
        description="List live dead letters (or, with --discarded, discarded ones), newest "
        "first. Filters combine.",
    )
    listing.add_argument("--id", type=_uuid, metavar="ID", help="only the letters of one message")
    listing.add_argument("--topic", metavar="T", help="only dead letters of this outbox topic")
    listing.add_argument("--route", metavar="R", help="only dead letters of this route")
    _add_since(listing)
    listing.add_argument(
        "--discarded", action="store_true", help="list discarded dead letters instead"
    )
    listing.add_argument(
        "--limit", type=_positive, default=100, metavar="N", help="show at most N (default: 100)"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    retry = actions.add_parser(
        "retry",
        parents=[common],
        help="deliver dead letters again",
        description="Put live dead letters back in the outbox, in one transaction, with the "
        "same message id and idempotency key. A letter of a route is delivered again to that "
        "route only; a 'no-route' letter is routed afresh with the relays' current routes.",
    )
    _add_selection(retry, "retry")
    retry.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be retried, per route; change nothing",
    )
    discard = actions.add_parser(
        "discard",
        parents=[common],
        help="give up on dead letters for good (kept for audit)",
        description="Mark live dead letters discarded: kept for audit until `purge`, no "
        "longer counted, listed (see `list --discarded`) or retried. Asks for confirmation on "
        "a terminal; without one, needs --yes.",
    )
    _add_selection(discard, "discard")
    discard.add_argument("--reason", metavar="TEXT", help="why, recorded with each letter")
    discard.add_argument(
        "--dry-run", action="store_true", help="print what would be discarded; change nothing"
    )
    discard.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _add_selection(parser: argparse.ArgumentParser, verb: str) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=_uuid, metavar="ID", help=f"{verb} the letters of one message")
    which.add_argument("--topic", metavar="T", help=f"{verb} the letters of this outbox topic")
    which.add_argument("--all", action="store_true", help=f"{verb} every dead letter")
    parser.add_argument("--route", metavar="R", help="only dead letters of this route")
    _add_since(parser)


def _add_since(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since",
        type=_when,
        metavar="WHEN",
        help="only letters dead-lettered since then: a duration ago (15m, 7d) or an ISO-8601 time",
    )


def _add_replay_and_purge(commands: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    replay = commands.add_parser(
        "replay",
        parents=[common],
        help="deliver again, to one route, messages it already delivered",
        description="Queue again, for one route only, messages of a topic that route "
        "delivered (from the delivery log), with their original message id and idempotency "
        "key: consumers see the same idempotency-key, receivers the same webhook-id. In the "
        "order they were first delivered; the idempotency table is not touched.",
    )
    replay.add_argument("--topic", required=True, type=_nonempty, metavar="T", help="outbox topic")
    replay.add_argument("--route", required=True, type=_nonempty, metavar="R", help="the route")
    replay.add_argument(
        "--since", type=_when, metavar="WHEN", help="delivered at or after: 2h (ago) or ISO-8601"
    )
    replay.add_argument(
        "--until", type=_when, metavar="WHEN", help="delivered before: 1h (ago) or ISO-8601"
    )
    replay.add_argument("--key", metavar="K", help=r"only this message key (text, or \x hex)")
    replay.add_argument(
        "--limit", type=_positive, metavar="N", help="at most N messages, the first delivered"
    )
    replay.add_argument("--dry-run", action="store_true", help="count only; change nothing")
    purge = commands.add_parser(
        "purge",
        parents=[common],
        help="delete old delivery records, discarded dead letters and inbox rows",
        description="Delete delivery records delivered, and dead letters discarded, longer ago "
        "than --older-than; live dead letters stay. With --inbox-older-than, also the inbox "
        "rows consumers accepted longer ago than that: keep them longer than any redelivery "
        "can come (at least as long as the delivery log, which `replay` reads). Runs in small "
        "batches, each a short transaction that never makes the relays wait.",
    )
    purge.add_argument(
        "--older-than",
        type=_older_than,
        metavar="DURATION",
        help="delivery records and discarded dead letters older than this, e.g. 7d, 12h, 30m",
    )
    purge.add_argument(
        "--inbox-older-than",
        type=_older_than,
        metavar="DURATION",
        help="inbox rows accepted longer ago than this, e.g. 30d",
    )
    purge.add_argument(
        "--batch-size",
        type=_positive,
        default=5000,
        metavar="N",
        help="rows per transaction (default: 5000)",
    )
    purge.add_argument("--dry-run", action="store_true", help="count only; change nothing")


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


def _checked(check: Callable[[str], T], raw: str) -> T:
    """``check(raw)``, its ValueError becoming argparse's one-line usage error."""
    try:
        return check(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _when(raw: str) -> When:
    from .moments import parse_when

    return _checked(parse_when, raw)


def _older_than(raw: str) -> Duration:
    from .moments import parse_positive_duration

    return Duration(raw.strip(), _checked(parse_positive_duration, raw))


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return raw


def _route_name(raw: str) -> str:
    from .routestate import check_route_name

    return _checked(check_route_name, raw)


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {raw!r}")
    return value
