"""Settings over generated config files (hypothesis): every file either loads into settings
the relay can run with, or is refused with one ``ConfigError``; never another exception."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import MAX_INT, MAX_SECONDS, Settings, load_settings, signing_keys
from relay.errors import ConfigError
from relay.sinks.webhook import WebhookSink

SECRET = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


def mostly(good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four: most files get far enough to meet the odd values."""
    return st.integers(0, 3).flatmap(lambda n: odd if n == 0 else good)


NUMBERS = (
    st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats()
    | st.sampled_from([0, 1, 2**31 - 1, 2**31, 2_147_483.0, 2_147_484.0, math.nan, math.inf])
)
TEXT = st.text(max_size=30)
URLS = st.sampled_from(
    [
        "https://hooks.example/h",
        "http://0177.0.0.1/",
        "http://[::1/h",
        "http://127.0.0.1:8080/h",
        "https:///h",
        "ftp://e.x/",
        "http://a:99999/",
        "http://exa mple.com/",
        "https://e.x/h?token=abc",
    ]
) | TEXT.map(lambda t: "https://" + t)
ROUTE = st.fixed_dictionaries(
    {
        "name": mostly(st.sampled_from(["hook", "k-2"]), st.sampled_from(["bad name", ""]) | TEXT),
        "topics": mostly(st.just(["orders.*"]), st.lists(TEXT, max_size=3)),
        "sink": mostly(st.sampled_from(["webhook", "kafka"]), st.just("nats") | TEXT),
    },
    optional={
        "url": URLS,
        "secret": mostly(st.just(SECRET), TEXT),
        "timeout_s": NUMBERS,
        "max_attempts": NUMBERS,
        "backoff_initial_s": NUMBERS,
        "backoff_max_s": NUMBERS,
        "concurrency": NUMBERS,
        "rate_limit_per_s": NUMBERS,
        "allow_private_network": st.booleans() | TEXT,
        "kafka_topic": TEXT,
    },
)
SCALARS = st.fixed_dictionaries(
    {},
    optional={
        "batch_size": NUMBERS | TEXT,
        "hold_seconds": NUMBERS | TEXT,
        "lease_seconds": NUMBERS | TEXT,
        "poll_interval": NUMBERS | TEXT,
        "schema": mostly(st.just("app_1"), TEXT),
        "metrics_port": NUMBERS,
    },
)
PRODUCER = st.dictionaries(
    st.sampled_from(["linger.ms", "acks", "message.timeout.ms", "enable.idempotence", "x.y"]),
    NUMBERS | TEXT | st.booleans(),
    max_size=3,
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def toml_document(scalars: dict[str, Any], producer: dict[str, Any], routes: list[Any]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in scalars.items()]
    lines += ["[kafka]", 'bootstrap_servers = "127.0.0.1:9092"', "[kafka.producer]"]
    lines += [f'"{k}" = {toml_value(v)}' for k, v in producer.items()]
    for route in routes:
        lines.append("[[routes]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in route.items()]
    return "\n".join(lines) + "\n"


def assert_runnable(loaded: Settings) -> None:
    """What was accepted is what the relay can run with."""
    assert 0 < loaded.hold_seconds <= MAX_SECONDS
    assert 0 < loaded.batch_size <= MAX_INT
    for route in loaded.effective_routes():
        for name in ("timeout_s", "backoff_initial_s", "backoff_max_s"):
            value = getattr(route, name)
            assert value is None or (math.isfinite(value) and 0 < value <= MAX_SECONDS)
        if route.sink == "webhook":
            WebhookSink(route, signing_keys(route))


@settings(max_examples=300)
@given(scalars=SCALARS, producer=PRODUCER, routes=st.lists(ROUTE, max_size=2))
def test_a_config_file_loads_runnable_settings_or_is_one_config_error(
    tmp_path_factory: Any, scalars: dict[str, Any], producer: dict[str, Any], routes: list[Any]
) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "relay.toml"
    path.write_text(toml_document(scalars, producer, routes), encoding="utf-8")
    try:
        loaded = load_settings({}, {}, str(path))
    except ConfigError:
        return
    assert_runnable(loaded)
