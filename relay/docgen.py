"""Write the reference parts of ``docs/`` from the code they describe.

``docs/configuration.md`` gets its tables from :mod:`relay.config` (:data:`~relay.config.OPTIONS`,
the :class:`~relay.config.Route` fields and :data:`~relay.config.KAFKA_PRODUCER_DEFAULTS`);
``docs/metrics.md`` gets its table from :data:`relay.metrics.METRICS`. The prose around the
tables is written by hand: only the text between a pair of markers is generated::

    <!-- BEGIN GENERATED options: python -m relay.docgen -->
    ...
    <!-- END GENERATED options -->

``python -m relay.docgen`` rewrites the files; ``--check`` changes nothing and exits 1,
naming the stale files, when a file differs from what the code says.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import config
from .cli_parser import build_parser
from .config import KAFKA_PRODUCER_DEFAULTS, OPTIONS, Option, Route
from .metrics import METRICS, MetricSpec

DOCS = Path(__file__).resolve().parents[1] / "docs"
DASH = "—"
_ENV = re.compile(r"\benv (OUTBOX_[A-Z_]+)")


class DocgenError(Exception):
    """The docs cannot be generated: a marker is missing or a setting has no description."""


# What each parser accepts, in words. A new parser must be added here, or generation fails.
_ACCEPTS: Mapping[Callable[[str], Any], str] = {
    str: "text",
    config._schema: "SQL identifier",
    config._port: "port, `0`-`65535`",
    config._positive_int: "integer > 0",
    config._seconds: "duration",
    config._log_level: "`debug`, `info`, `warning`, `error`",
    config._log_format: "`text`, `json`",
    config._switch: "`true`, `false`",
}

# Route keys: which sink reads them and what they mean. Every Route field must be here.
_BOTH, _KAFKA, _WEBHOOK = "both", "kafka", "webhook"
_ROUTE_DOCS: Mapping[str, tuple[str, str]] = {
    "name": (_BOTH, "unique; shown in metrics, dead letters and `outbox-relay routes`"),
    "topics": (_BOTH, 'glob patterns over outbox topics, e.g. `["orders.*"]`'),
    "sink": (_BOTH, "`kafka` or `webhook`"),
    "kafka_topic": (_KAFKA, "Kafka topic to produce to; unset: the outbox topic's own name"),
    "url": (_WEBHOOK, "`http://` or `https://` endpoint; required for a webhook route"),
    "secret": (
        _WEBHOOK,
        "Standard Webhooks signing secret `whsec_...`; several, space-separated, while "
        "rotating; this or `secret_env` is required",
    ),
    "timeout_s": (_WEBHOOK, "seconds one request may take"),
    "max_attempts": (_BOTH, "attempts before the message is dead-lettered"),
    "backoff_initial_s": (_BOTH, "first retry delay in seconds; doubles per attempt, with jitter"),
    "backoff_max_s": (_BOTH, "cap on one retry delay; a longer `Retry-After` wins (up to a day)"),
    "allow_private_network": (
        _WEBHOOK,
        "`true` lets the route reach loopback, private and link-local addresses",
    ),
    "concurrency": (_WEBHOOK, "requests in flight at once for this route"),
    "rate_limit_per_s": (_WEBHOOK, "at most this many requests a second; unset: no limit"),
    "secret_env": (_WEBHOOK, "name of an environment variable holding the secret"),
}
_ROUTE_TYPE_NAMES: Mapping[str, str] = {
    "name": "string",
    "topics": "list of strings",
    "sink": "string",
}
# Route fields whose default depends on the sink, read through these properties.
_EFFECTIVE = {"backoff_initial_s": "first_backoff", "backoff_max_s": "max_backoff"}


def _code(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _option_default(option: Option) -> str:
    if option.parse is config._seconds and option.default is not None:
        return f"`{option.default:g}s`"
    return _code(option.default)


def _accepts(option: Option) -> str:
    try:
        return _ACCEPTS[option.parse]
    except KeyError:
        raise DocgenError(f"option {option.name}: add its parser to _ACCEPTS") from None


def _leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, set[str]]:
    """Each command line (``run``, ``dead-letters list``) and the settings it has flags for:
    the flags whose help names their ``OUTBOX_*`` variable (a command's own ``--batch-size``,
    like purge's, is another thing)."""
    leaves: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                leaves.update(_leaf_commands(sub, f"{prefix}{name} "))
    if not leaves and prefix:
        leaves[prefix.strip()] = {
            env for action in parser._actions for env in _ENV.findall(action.help or "")
        }
    return leaves


def _commands(option: Option, leaves: Mapping[str, set[str]]) -> str:
    """Which commands take the option's flag: ``all``, ``all but `demo` ``, or a list."""
    taking = [name for name, envs in leaves.items() if option.env in envs]
    others = [name for name in leaves if name not in taking]
    if not taking:
        return "`run` (no flag: environment or file only)"
    if not others:
        return "all"
    if len(others) < len(taking):
        return "all but " + ", ".join(f"`{name}`" for name in others)
    return ", ".join(f"`{name}`" for name in taking)


def _has_flag(option: Option, leaves: Mapping[str, set[str]]) -> bool:
    return any(option.env in envs for envs in leaves.values())


def options_table() -> str:
    """Every scalar setting: flag, variable, TOML key, default, what it accepts, its help."""
    rows = ["| flag | environment | TOML key | default | accepts | commands | meaning |"]
    rows.append("|---|---|---|---|---|---|---|")
    leaves = _leaf_commands(build_parser())
    for option in OPTIONS:
        flag = f"`{option.flag}`" if _has_flag(option, leaves) else DASH
        rows.append(
            f"| {flag} | `{option.env}` | `{option.name}` | {_option_default(option)} "
            f"| {_accepts(option)} | {_commands(option, leaves)} | {option.help} |"
        )
    return "\n".join(rows)


def _route_type(name: str) -> str:
    if name in _ROUTE_TYPE_NAMES:
        return _ROUTE_TYPE_NAMES[name]
    types = config._ROUTE_TYPES[name]
    if types == (int, float):
        return "number"
    return {bool: "boolean", int: "integer", str: "string"}[types[0]]


def _route_default(name: str, sink: str, applies: str) -> str:
    if applies not in (_BOTH, sink):
        return ""
    fields = {f.name: f for f in dataclasses.fields(Route)}
    if fields[name].default is dataclasses.MISSING:
        return "required"
    route = Route(name="r", topics=("*",), sink="kafka" if sink == _KAFKA else "webhook")
    return _code(getattr(route, _EFFECTIVE.get(name, name)))


def _check_route_docs() -> None:
    fields = [f.name for f in dataclasses.fields(Route)]
    missing = [name for name in fields if name not in _ROUTE_DOCS]
    if missing:
        raise DocgenError(f"route keys without a description in relay/docgen.py: {missing}")
    unknown = set(fields) ^ config._ROUTE_KEYS
    if unknown:
        raise DocgenError(f"Route fields and TOML route keys differ: {sorted(unknown)}")


def routes_table() -> str:
    """Every ``[[routes]]`` key: type, default per sink (blank: not read), meaning."""
    _check_route_docs()
    rows = ["| key | type | default, kafka | default, webhook | meaning |", "|---|---|---|---|---|"]
    for name, (applies, meaning) in _ROUTE_DOCS.items():
        kafka, webhook = (_route_default(name, sink, applies) for sink in (_KAFKA, _WEBHOOK))
        rows.append(f"| `{name}` | {_route_type(name)} | {kafka} | {webhook} | {meaning} |")
    return "\n".join(rows)


def producer_table() -> str:
    """The relay's librdkafka defaults; ``[kafka.producer]`` overrides any of them."""
    rows = ["| property | default |", "|---|---|"]
    rows += [f"| `{key}` | {_code(value)} |" for key, value in KAFKA_PRODUCER_DEFAULTS.items()]
    return "\n".join(rows)


def _buckets(spec: MetricSpec) -> str:
    return ", ".join(f"{bound:g}" for bound in spec.buckets)


def metrics_table() -> str:
    """Every metric of a relay: name, type, labels, whether the contract fixes it, help."""
    rows = ["| metric | type | labels | contract | help |", "|---|---|---|---|---|"]
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or DASH
        fixed = "yes" if spec.contract else ""
        rows.append(f"| `{spec.name}` | {spec.kind} | {labels} | {fixed} | {spec.help} |")
    rows.append("")
    rows.append("Histogram buckets (upper bounds):")
    rows.append("")
    rows += [f"- `{s.name}`: {_buckets(s)}" for s in METRICS if s.kind == "histogram"]
    return "\n".join(rows)


GENERATED: Mapping[str, Mapping[str, Callable[[], str]]] = {
    "configuration.md": {
        "options": options_table,
        "routes": routes_table,
        "producer": producer_table,
    },
    "metrics.md": {"metrics": metrics_table},
}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- BEGIN GENERATED {name}: python -m relay\.docgen -->\n)"
        rf"(?:.*?\n)?"
        rf"(<!-- END GENERATED {name} -->)",
        re.DOTALL,
    )


def render(text: str, sections: Mapping[str, Callable[[], str]], where: str = "") -> str:
    """``text`` with the content between each section's markers replaced by its table."""
    for name, make in sections.items():
        match = _block(name).search(text)
        if match is None:
            raise DocgenError(f"{where}: no markers for the generated section {name!r}")
        text = text[: match.end(1)] + make() + "\n" + text[match.start(2) :]
    return text


def expected(docs: Path = DOCS) -> dict[Path, str]:
    """What each generated file should contain, given its hand-written parts on disk."""
    files = {}
    for filename, sections in GENERATED.items():
        path = docs / filename
        files[path] = render(path.read_text("utf-8"), sections, str(path))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relay.docgen", description="Regenerate the reference tables in docs/."
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder")
    args = parser.parse_args(argv)
    try:
        files = expected(args.docs)
    except (DocgenError, OSError) as exc:
        print(f"docgen: {exc}", file=sys.stderr)
        return 2
    stale = [path for path, text in files.items() if path.read_text("utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path} is stale: run `make docs`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(files[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
