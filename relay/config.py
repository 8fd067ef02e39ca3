"""The relay's settings: one typed object built once, at the edge, from flags > env > TOML.

Every scalar setting is declared once in :data:`OPTIONS`; the CLI flags, the ``OUTBOX_*``
variables, the TOML keys and the configuration reference are all derived from that table.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from outbox_lib._encoding import check_schema_name
from outbox_lib._signature import SecretError, parse_secrets

from .durations import parse_duration
from .errors import ConfigError
from .sinks.ssrf import blocked_reason, literal_ip

SinkKind = Literal["kafka", "webhook"]
ProducerValue = str | int | float | bool


# PostgreSQL's timeouts are milliseconds in a 32-bit int, and librdkafka's integer
# properties are C ints: the largest duration (about 24.8 days) and integer either takes.
MAX_SECONDS = 2_147_483.0
MAX_INT = 2**31 - 1


def _positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value <= MAX_INT:
        raise ValueError(f"must be a positive integer of at most {MAX_INT}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _seconds(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be a positive duration")
    if value > MAX_SECONDS:
        raise ValueError(f"must be at most {MAX_SECONDS:g} s (about 24 days)")
    return value


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of debug, info, warning, error")
    return level


def _log_format(text: str) -> str:
    if text not in {"text", "json"}:
        raise ValueError("must be text or json")
    return text


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
        raise ValueError("must be true or false")
    return value in {"true", "1", "yes", "on"}


def _schema(text: str) -> str:
    try:
        return check_schema_name(text)
    except ValueError as exc:
        raise ValueError("must be a plain SQL identifier") from exc


@dataclass(frozen=True, slots=True)
class Option:
    """One scalar setting: its attribute, parser, default and help."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "OUTBOX_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("database_url", str, None, "PostgreSQL URL (libpq or SQLAlchemy form)"),
    Option("schema", _schema, "outbox", "schema holding the outbox tables"),
    Option("kafka_bootstrap_servers", str, None, "Kafka bootstrap servers (host:port,...)"),
    Option("metrics_port", _port, None, "port serving /metrics, /healthz and /readyz"),
    Option(
        "metrics_refresh_seconds",
        _seconds,
        5.0,
        "how often lag, pending and dead-letter gauges and readiness are refreshed",
    ),
    Option("batch_size", _positive_int, 2000, "messages claimed per batch"),
    Option(
        "lease_seconds",
        _seconds,
        120.0,
        "how long a retry's claim is held before another relay may take it",
    ),
    Option(
        "hold_seconds",
        _seconds,
        5.0,
        "with several routes: longest the first pass waits for one; the rest go to its retries",
    ),
    Option("poll_interval", _seconds, 1.0, "longest sleep between claims when NOTIFY is quiet"),
    Option(
        "bucket_lease_seconds",
        _seconds,
        10.0,
        "how long a relay's key buckets stay its own without a heartbeat (crash takeover time)",
    ),
    Option("heartbeat_seconds", _seconds, 2.0, "how often a relay renews its bucket leases"),
    Option("shutdown_grace", _seconds, 10.0, "time given to in-flight sends on SIGTERM"),
    Option("log_level", _log_level, "INFO", "debug, info, warning or error"),
    Option("log_format", _log_format, "text", "text or json"),
    Option(
        "otel_spans",
        _switch,
        False,
        "record OpenTelemetry spans of claims and deliveries: true or false (needs the otel extra)",
    ),
)
OPTION_BY_NAME = {option.name: option for option in OPTIONS}

# librdkafka defaults chosen for an outbox: no duplicates from retries, keep order, survive
# long outages without failing messages, batch on the wire.
KAFKA_PRODUCER_DEFAULTS: Mapping[str, ProducerValue] = {
    "enable.idempotence": True,
    "acks": "all",
    "max.in.flight.requests.per.connection": 5,
    "linger.ms": 10,
    "batch.num.messages": 10000,
    "compression.type": "lz4",
    "message.timeout.ms": 60000,
    "queue.buffering.max.messages": 500000,
    "queue.buffering.max.kbytes": 1048576,
    "partitioner": "murmur2_random",
}


@dataclass(frozen=True, slots=True)
class Route:
    """Where messages whose topic matches ``topics`` (glob patterns) are sent."""

    name: str
    topics: tuple[str, ...]
    sink: SinkKind
    kafka_topic: str | None = None
    url: str | None = None
    secret: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0
    max_attempts: int = 12
    backoff_initial_s: float | None = None
    backoff_max_s: float | None = None
    allow_private_network: bool = False
    concurrency: int = 16
    rate_limit_per_s: float | None = None
    secret_env: str | None = None

    @property
    def first_backoff(self) -> float:
        """First retry delay; Kafka retries sooner by default than webhooks."""
        if self.backoff_initial_s is not None:
            return float(self.backoff_initial_s)
        return 0.5 if self.sink == "kafka" else 5.0

    @property
    def max_backoff(self) -> float:
        if self.backoff_max_s is not None:
            return float(self.backoff_max_s)
        return 60.0 if self.sink == "kafka" else 36000.0

    def matches(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.topics)

    def target_topic(self, topic: str) -> str:
        """The Kafka topic a message of outbox topic ``topic`` goes to."""
        return self.kafka_topic or topic


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``outbox-relay`` needs, validated."""

    database_url: str | None = None
    schema: str = "outbox"
    kafka_bootstrap_servers: str | None = None
    metrics_port: int | None = None
    metrics_refresh_seconds: float = 5.0
    batch_size: int = 2000
    lease_seconds: float = 120.0
    hold_seconds: float = 5.0
    poll_interval: float = 1.0
    bucket_lease_seconds: float = 10.0
    heartbeat_seconds: float = 2.0
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"
    otel_spans: bool = False
    kafka_producer: Mapping[str, ProducerValue] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError("no database URL: pass --database-url or set OUTBOX_DATABASE_URL")
        return self.database_url

    def effective_routes(self) -> tuple[Route, ...]:
        """Configured routes, or the contract's default: every topic to Kafka, same name."""
        if self.routes:
            return self.routes
        if self.kafka_bootstrap_servers:
            return (Route(name="kafka", topics=("*",), sink="kafka"),)
        return ()

    def producer_config(self) -> dict[str, ProducerValue]:
        """librdkafka properties: our defaults, then the file's ``[kafka.producer]``."""
        config: dict[str, ProducerValue] = dict(KAFKA_PRODUCER_DEFAULTS)
        config.update(self.kafka_producer)
        if self.kafka_bootstrap_servers:
            config["bootstrap.servers"] = self.kafka_bootstrap_servers
        return config


def load_settings(
    flags: Mapping[str, Any], env: Mapping[str, str], config_path: str | None = None
) -> Settings:
    """Merge TOML file < environment < flags into :class:`Settings`.

    ``flags`` holds already-typed values (argparse parsed them); ``None`` means "not given".
    """
    path = config_path or env.get("OUTBOX_CONFIG")
    document = _read_toml(Path(path)) if path else {}
    values: dict[str, Any] = {}
    values.update(_scalars_from_file(document))
    values.update(_scalars_from_env(env))
    values.update({k: v for k, v in flags.items() if k in OPTION_BY_NAME and v is not None})
    kafka = _kafka_table(document.get("kafka", {}))
    if "bootstrap_servers" in kafka and "kafka_bootstrap_servers" not in values:
        values["kafka_bootstrap_servers"] = _file_str(kafka, "bootstrap_servers", "kafka")
    values["kafka_producer"] = _producer_props(kafka.get("producer", {}))
    values["routes"] = _routes(document.get("routes", []), env)
    settings = Settings(**values)
    _check_routes(settings)
    _check_leases(settings)
    _check_kafka_order(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    unknown = set(document) - set(OPTION_BY_NAME) - {"kafka", "routes"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown key {sorted(unknown)[0]!r}")
    return document


def _scalars_from_file(document: Mapping[str, Any]) -> dict[str, Any]:
    values = {}
    for name, option in OPTION_BY_NAME.items():
        if name in document:
            values[name] = _parse(option, str(document[name]), f"config key {name!r}")
    return values


def _scalars_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for option in OPTIONS:
        raw = env.get(option.env)
        if raw is not None and raw != "":
            values[option.name] = _parse(option, raw, option.env)
    return values


def _parse(option: Option, raw: str, source: str) -> Any:
    try:
        return option.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {raw!r} is invalid: {_reason(exc)}") from exc


def _reason(exc: ValueError) -> str:
    text = str(exc)
    return (
        "expected a number" if text.startswith(("invalid literal", "could not convert")) else text
    )


def argparse_type(option: Option) -> Callable[[str], Any]:
    """A flag parser whose error text argparse prints in its one-line message."""

    def parse(raw: str) -> Any:
        try:
            return option.parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{raw!r} is invalid: {_reason(exc)}") from exc

    parse.__name__ = option.name.replace("_", " ")
    return parse


def _kafka_table(table: Any) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError("config [kafka] must be a table (bootstrap_servers, [kafka.producer])")
    unknown = set(table) - {"bootstrap_servers", "producer"}
    if unknown:
        raise ConfigError(f"config [kafka]: unknown key {sorted(unknown)[0]!r}")
    return table


def _file_str(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config [{where}] {key}: expected a non-empty string")
    return value


def _producer_props(table: Any) -> dict[str, ProducerValue]:
    if not isinstance(table, Mapping):
        raise ConfigError("config [kafka.producer] must be a table of librdkafka properties")
    props: dict[str, ProducerValue] = {}
    for key, value in table.items():
        where = f"config [kafka.producer] {key!r}"
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"{where}: expected a string, number or bool")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        if isinstance(value, int) and not -MAX_INT - 1 <= value <= MAX_INT:
            raise ConfigError(f"{where}: {value} does not fit librdkafka's 32-bit integers")
        props[str(key)] = value
    return props


_ROUTE_KEYS = {
    "name", "topics", "sink", "kafka_topic", "url", "secret", "secret_env", "timeout_s",
    "max_attempts", "backoff_initial_s", "backoff_max_s", "allow_private_network",
    "concurrency", "rate_limit_per_s",
}  # fmt: skip
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _routes(tables: Any, env: Mapping[str, str]) -> tuple[Route, ...]:
    if not isinstance(tables, list):
        raise ConfigError("config: routes must be an array of tables ([[routes]])")
    routes = tuple(_with_secret(_route(index, table), env) for index, table in enumerate(tables))
    names = [route.name for route in routes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"config: two routes are named {duplicate!r}")
    return routes


def _with_secret(route: Route, env: Mapping[str, str]) -> Route:
    """Resolve ``secret_env``: the secret itself stays out of the config file."""
    if route.secret_env is None:
        return route
    if route.secret is not None:
        raise ConfigError(f"config route {route.name!r}: set secret or secret_env, not both")
    value = env.get(route.secret_env)
    if not value:
        raise ConfigError(
            f"config route {route.name!r}: secret_env names {route.secret_env}, which is not set"
        )
    return dataclasses.replace(route, secret=value)


def _route(index: int, table: Any) -> Route:
    where = f"config [[routes]] #{index + 1}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(table) - _ROUTE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name = table.get("name")
    if not isinstance(name, str) or not _ROUTE_NAME.match(name):
        raise ConfigError(f"{where}: name must be letters, digits, '.', '_' or '-'")
    where = f"config route {name!r}"
    topics = table.get("topics")
    if (
        not isinstance(topics, list)
        or not topics
        or not all(isinstance(t, str) and t for t in topics)
    ):
        raise ConfigError(f"{where}: topics must be a non-empty list of glob patterns")
    sink = table.get("sink")
    if sink not in ("kafka", "webhook"):
        raise ConfigError(f"{where}: sink must be 'kafka' or 'webhook', got {sink!r}")
    for key, value in table.items():
        _check_route_value(where, key, value)
    return Route(topics=tuple(topics), **{k: v for k, v in table.items() if k != "topics"})


_ROUTE_TYPES: Mapping[str, tuple[type, ...]] = {
    "kafka_topic": (str,),
    "url": (str,),
    "secret": (str,),
    "timeout_s": (int, float),
    "max_attempts": (int,),
    "backoff_initial_s": (int, float),
    "backoff_max_s": (int, float),
    "allow_private_network": (bool,),
    "concurrency": (int,),
    "rate_limit_per_s": (int, float),
    "secret_env": (str,),
}


_TYPE_NAMES: Mapping[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _check_route_value(where: str, key: str, value: Any) -> None:
    expected = _ROUTE_TYPES.get(key)
    if expected is None:
        return
    names = " or ".join(_TYPE_NAMES[t] for t in expected if t is not int or float not in expected)
    wrong_type = not isinstance(value, expected) or (bool not in expected and value is True)
    if wrong_type or isinstance(value, bool) != (bool in expected):
        raise ConfigError(f"{where}: {key} must be {_a(names)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {value!r}")
        limit = MAX_SECONDS if key.endswith("_s") and key != "rate_limit_per_s" else MAX_INT
        if value > limit:
            raise ConfigError(f"{where}: {key} must be at most {limit:g}, got {value!r}")
    if isinstance(value, str) and not value:
        raise ConfigError(f"{where}: {key} must not be empty")


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _check_leases(settings: Settings) -> None:
    if settings.heartbeat_seconds * 3 > settings.bucket_lease_seconds:
        raise ConfigError(
            f"heartbeat_seconds ({settings.heartbeat_seconds:g}) must be at most a third of "
            f"bucket_lease_seconds ({settings.bucket_lease_seconds:g}), or a relay could lose "
            "its buckets between two heartbeats"
        )


def _truthy(value: ProducerValue | None) -> bool:
    return str(value).strip().lower() in {"true", "1", "yes", "on"}


def _in_flight(config: Mapping[str, ProducerValue]) -> int:
    try:
        return int(str(config.get("max.in.flight.requests.per.connection", 5)))
    except ValueError:
        return 5  # not a number: librdkafka reports it when the producer is created


def _check_kafka_order(settings: Settings) -> None:
    """librdkafka keeps per-partition order under retries only with idempotence and <= 5
    requests in flight; refuse the one combination that librdkafka would refuse later."""
    config = settings.producer_config()
    in_flight = _in_flight(config)
    if _truthy(config.get("enable.idempotence")) and in_flight > 5:
        raise ConfigError(
            "[kafka.producer] max.in.flight.requests.per.connection must be at most 5 with "
            f"enable.idempotence (got {in_flight}); more would break per-key order on retries"
        )


def order_warnings(settings: Settings) -> list[str]:
    """Producer overrides that give up per-key order; logged when the relay starts."""
    config = settings.producer_config()
    warnings = []
    in_flight = _in_flight(config)
    if not _truthy(config.get("enable.idempotence")) and in_flight > 1:
        warnings.append(
            "enable.idempotence is off with max.in.flight.requests.per.connection > 1: a "
            "retried Kafka request can reorder messages of one key"
        )
    if config.get("partitioner") != KAFKA_PRODUCER_DEFAULTS["partitioner"]:
        warnings.append(
            f"partitioner is {config.get('partitioner')!r}: keys map to partitions "
            "differently from the Java client's default (murmur2_random)"
        )
    return warnings


def _check_routes(settings: Settings) -> None:
    for route in settings.routes:
        if route.sink == "kafka" and not settings.kafka_bootstrap_servers:
            raise ConfigError(
                f"route {route.name!r} sends to Kafka but no bootstrap servers are set "
                "([kafka] bootstrap_servers or OUTBOX_KAFKA_BOOTSTRAP_SERVERS)"
            )
        if route.sink == "webhook":
            _check_webhook(route)


def signing_keys(route: Route) -> tuple[bytes, ...]:
    """The route's signing keys; checked when a relay starts (other commands ignore them)."""
    try:
        return parse_secrets(route.secret or "")
    except SecretError as exc:
        raise ConfigError(f"route {route.name!r}: {exc}") from None


def _check_webhook(route: Route) -> None:
    where = f"route {route.name!r}"
    if not route.url:
        raise ConfigError(f"{where}: a webhook route needs a url")
    import httpx  # noqa: PLC0415 (lazily: --help and usage errors stay fast)

    try:
        parts = urlsplit(route.url)
        httpx.URL(route.url)  # what the sink will parse it with
    except (ValueError, httpx.InvalidURL) as exc:
        # Not the URL itself: its path or query may hold a token.
        raise ConfigError(f"{where}: url is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: url must be an http:// or https:// URL with a host name")
    if not route.secret:
        raise ConfigError(
            f"{where}: a webhook route needs a secret (whsec_..., or secret_env naming an "
            "environment variable that holds it): every request is signed"
        )
    ip = literal_ip(parts.hostname)
    reason = blocked_reason(ip) if ip is not None and not route.allow_private_network else None
    if reason:
        raise ConfigError(
            f"{where}: url points at {ip} ({reason}); set allow_private_network = true to allow it"
        )
