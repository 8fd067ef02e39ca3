"""Settings: flags > environment > TOML file, routes, and the Kafka producer config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from outbox_lib import ConfigurationError
from relay.config import Route, Settings, load_settings, order_warnings, signing_keys
from relay.errors import ConfigError

CONTRACT_TOML = """
[kafka]
bootstrap_servers = "localhost:9092"
[kafka.producer]            # any librdkafka producer property, passed through
"linger.ms" = 20

[[routes]]
name = "orders-to-kafka"
topics = ["orders.*"]       # glob patterns over outbox topics
sink = "kafka"
kafka_topic = "orders"      # optional; default: the outbox topic's own name

[[routes]]
name = "billing-hook"
topics = ["orders.created"]
sink = "webhook"
url = "https://billing.example/hooks/orders"
secret = "whsec_..."        # Standard Webhooks signing secret
timeout_s = 10
max_attempts = 12
backoff_initial_s = 5       # first retry delay; doubles per attempt, with jitter
backoff_max_s = 36000       # cap on one delay
allow_private_network = false   # true lets a route target loopback/private addresses
"""


@pytest.fixture
def toml(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / "relay.toml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


def test_defaults_without_any_source() -> None:
    settings = load_settings({}, {})
    assert settings == Settings()
    assert settings.schema == "outbox"
    assert settings.batch_size == 2000
    assert settings.effective_routes() == ()


def test_flags_beat_env_beat_file(toml: Callable[[str], str]) -> None:
    path = toml(
        'batch_size = 10\nschema = "from_file"\nlog_level = "debug"\npoll_interval = "3s"\n'
    )
    env = {"OUTBOX_BATCH_SIZE": "20", "OUTBOX_SCHEMA": "from_env"}
    settings = load_settings({"batch_size": 30, "schema": None}, env, path)
    assert settings.batch_size == 30  # flag
    assert settings.schema == "from_env"  # env; a None flag means "not given"
    assert settings.log_level == "DEBUG"  # file only
    assert settings.poll_interval == 3.0


def test_config_path_comes_from_outbox_config(toml: Callable[[str], str]) -> None:
    path = toml("lease_seconds = 30\n")
    assert load_settings({}, {"OUTBOX_CONFIG": path}).lease_seconds == 30.0


def test_env_bootstrap_servers_beat_the_file(toml: Callable[[str], str]) -> None:
    path = toml('[kafka]\nbootstrap_servers = "file:9092"\n')
    env = {"OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "env:9092"}
    assert load_settings({}, env, path).kafka_bootstrap_servers == "env:9092"
    assert load_settings({}, {}, path).kafka_bootstrap_servers == "file:9092"


def test_empty_env_value_counts_as_unset() -> None:
    assert load_settings({}, {"OUTBOX_BATCH_SIZE": ""}).batch_size == 2000


def test_contract_example_parses_into_routes(toml: Callable[[str], str]) -> None:
    settings = load_settings({}, {}, toml(CONTRACT_TOML))
    assert settings.kafka_bootstrap_servers == "localhost:9092"
    kafka, hook = settings.effective_routes()
    assert kafka == Route(
        name="orders-to-kafka", topics=("orders.*",), sink="kafka", kafka_topic="orders"
    )
    assert hook == Route(
        name="billing-hook",
        topics=("orders.created",),
        sink="webhook",
        url="https://billing.example/hooks/orders",
        secret="whsec_...",
        timeout_s=10,
        max_attempts=12,
        backoff_initial_s=5,
        backoff_max_s=36000,
        allow_private_network=False,
    )
    assert hook.first_backoff == 5.0
    assert hook.max_backoff == 36000.0
    assert "whsec_" not in repr(hook)  # the secret stays out of logs
    assert settings.producer_config()["linger.ms"] == 20


def test_default_route_when_only_bootstrap_servers_are_set() -> None:
    settings = load_settings({}, {"OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092"})
    assert settings.routes == ()
    (route,) = settings.effective_routes()
    assert (route.name, route.topics, route.sink) == ("kafka", ("*",), "kafka")
    assert route.matches("anything.at.all")
    assert route.target_topic("orders.created") == "orders.created"


def test_producer_config_merges_defaults_overrides_and_servers(toml: Callable[[str], str]) -> None:
    path = toml(
        '[kafka]\nbootstrap_servers = "k:9092"\n'
        '[kafka.producer]\n"linger.ms" = 5\n"compression.type" = "zstd"\n"client.id" = "me"\n'
    )
    config = load_settings({}, {}, path).producer_config()
    assert config["enable.idempotence"] is True
    assert config["partitioner"] == "murmur2_random"
    assert config["acks"] == "all"
    assert config["linger.ms"] == 5
    assert config["compression.type"] == "zstd"
    assert config["client.id"] == "me"
    assert config["bootstrap.servers"] == "k:9092"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OUTBOX_BATCH_SIZE": "abc"}, "OUTBOX_BATCH_SIZE: 'abc' is invalid: expected a number"),
        ({"OUTBOX_BATCH_SIZE": "0"}, "OUTBOX_BATCH_SIZE.*positive"),
        ({"OUTBOX_METRICS_PORT": "70000"}, "OUTBOX_METRICS_PORT.*port number"),
        ({"OUTBOX_LEASE_SECONDS": "soon"}, "OUTBOX_LEASE_SECONDS.*not a duration"),
        ({"OUTBOX_POLL_INTERVAL": "0s"}, "OUTBOX_POLL_INTERVAL.*positive"),
        ({"OUTBOX_SCHEMA": "a-b"}, "OUTBOX_SCHEMA.*plain SQL identifier"),
        ({"OUTBOX_LOG_LEVEL": "loud"}, "OUTBOX_LOG_LEVEL"),
        ({"OUTBOX_LOG_FORMAT": "xml"}, "OUTBOX_LOG_FORMAT.*text or json"),
    ],
)
def test_invalid_env_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings({}, env)


def test_config_error_is_a_configuration_error() -> None:
    assert issubclass(ConfigError, ConfigurationError)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("batch_sise = 10\n", "unknown key 'batch_sise'"),
        ("batch_size = \n", "not valid TOML"),
        ("batch_size = 0\n", "config key 'batch_size'"),
        (
            '[kafka]\nbootstrap_servers = "k"\n'
            '[[routes]]\nname = "a"\ntopics = ["x"]\nsink = "kafka"\n'
            '[[routes]]\nname = "a"\ntopics = ["y"]\nsink = "kafka"\n',
            "two routes are named 'a'",
        ),
        (
            '[[routes]]\nname = "hook"\ntopics = ["x"]\nsink = "webhook"\n',
            "'hook': a webhook route needs a url",
        ),
        (
            '[[routes]]\nname = "k"\ntopics = ["x"]\nsink = "kafka"\n',
            "'k' sends to Kafka but no bootstrap servers",
        ),
        ('[[routes]]\nname = "k"\ntopics = []\nsink = "kafka"\n', "topics must be a non-empty"),
        ('[[routes]]\nname = "k"\ntopics = ["x"]\nsink = "nats"\n', "sink must be 'kafka' or"),
        (
            '[[routes]]\nname = "k"\ntopics = ["x"]\nsink = "kafka"\nkafkatopic = "y"\n',
            "unknown key 'kafkatopic'",
        ),
        ('[[routes]]\nname = "bad name"\ntopics = ["x"]\nsink = "kafka"\n', "name must be"),
        ('[kafka.producer]\n"linger.ms" = [1]\n', "linger.ms"),
        ('[kafka.producer]\n"linger.ms" = inf\n', "'linger.ms': must be a finite number"),
        ('[kafka.producer]\n"message.timeout.ms" = 2147483648\n', "32-bit integers"),
        ("hold_seconds = 2147483648\n", r"hold_seconds.*at most 2\.14748e\+06 s"),
        ("batch_size = 2147483648\n", "at most 2147483647"),
    ],
)
def test_bad_config_files_are_config_errors(
    toml: Callable[[str], str], text: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings({}, {}, toml(text))


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b'schema = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(byte 0xe9 at offset 13\)"):
        load_settings({}, {}, str(path))


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({}, {}, str(missing))


def test_kafka_key_that_is_not_a_table_is_a_config_error(toml: Callable[[str], str]) -> None:
    with pytest.raises(ConfigError):
        load_settings({}, {}, toml('kafka = "localhost:9092"\n'))


def test_unknown_key_in_kafka_table_is_a_config_error(toml: Callable[[str], str]) -> None:
    with pytest.raises(ConfigError, match="bootstrap_server"):
        load_settings({}, {}, toml('[kafka]\nbootstrap_server = "localhost:9092"\n'))


@pytest.mark.parametrize(
    "line", ['max_attempts = "twelve"', 'allow_private_network = "false"', 'timeout_s = "10s"']
)
def test_route_values_of_the_wrong_type_are_config_errors(
    toml: Callable[[str], str], line: str
) -> None:
    text = (
        f'[[routes]]\nname = "h"\ntopics = ["x"]\nsink = "webhook"\nurl = "https://e.x"\n{line}\n'
    )
    with pytest.raises(ConfigError):
        load_settings({}, {}, toml(text))


def test_route_matching_uses_case_sensitive_globs() -> None:
    route = Route(name="r", topics=("orders.*", "billing.?"), sink="kafka")
    assert route.matches("orders.created")
    assert route.matches("billing.x")
    assert not route.matches("billing.xy")
    assert not route.matches("Orders.created")
    assert not route.matches("orders")


def test_target_topic_defaults_to_the_outbox_topic() -> None:
    assert Route(name="r", topics=("*",), sink="kafka").target_topic("a.b") == "a.b"
    assert Route(name="r", topics=("*",), sink="kafka", kafka_topic="k").target_topic("a.b") == "k"


def test_backoff_defaults_per_sink_kind() -> None:
    kafka = Route(name="k", topics=("*",), sink="kafka")
    hook = Route(name="h", topics=("*",), sink="webhook", url="https://e.x")
    assert (kafka.first_backoff, kafka.max_backoff) == (0.5, 60.0)
    assert (hook.first_backoff, hook.max_backoff) == (5.0, 36000.0)
    tuned = Route(name="t", topics=("*",), sink="kafka", backoff_initial_s=2, backoff_max_s=9)
    assert (tuned.first_backoff, tuned.max_backoff) == (2.0, 9.0)


def test_require_database_url_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="OUTBOX_DATABASE_URL"):
        Settings().require_database_url()
    url = "postgresql://u@h/db"
    assert load_settings({}, {"OUTBOX_DATABASE_URL": url}).require_database_url() == url


def test_bucket_lease_defaults_keep_takeover_under_15_seconds() -> None:
    settings = load_settings({}, {})
    assert settings.bucket_lease_seconds <= 15
    assert settings.heartbeat_seconds * 3 <= settings.bucket_lease_seconds


def test_heartbeat_must_fit_three_times_in_the_bucket_lease() -> None:
    with pytest.raises(ConfigError, match=r"heartbeat_seconds .* at most a third"):
        load_settings({"bucket_lease_seconds": 3.0, "heartbeat_seconds": 2.0}, {})


def test_more_than_five_in_flight_with_idempotence_is_refused(toml: Callable[[str], str]) -> None:
    path = toml('[kafka]\nbootstrap_servers = "k:9092"\n[kafka.producer]\n'
                '"max.in.flight.requests.per.connection" = 6\n')  # fmt: skip
    with pytest.raises(ConfigError, match=r"at most 5 with enable\.idempotence"):
        load_settings({}, {}, path)


def test_overrides_that_give_up_key_order_are_warned_about(toml: Callable[[str], str]) -> None:
    path = toml(
        '[kafka]\nbootstrap_servers = "k:9092"\n[kafka.producer]\n'
        '"enable.idempotence" = false\n"partitioner" = "consistent_random"\n'
    )
    warnings = order_warnings(load_settings({}, {}, path))
    assert any("idempotence is off" in w for w in warnings)
    assert any("consistent_random" in w for w in warnings)
    assert order_warnings(load_settings({"kafka_bootstrap_servers": "k:9092"}, {})) == []


# --- webhook routes -------------------------------------------------------------------------

HOOK = '[[routes]]\nname = "hook"\ntopics = ["orders.*"]\nsink = "webhook"\n'
GOOD_SECRET = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (f'url = "ftp://e.x/h"\nsecret = "{GOOD_SECRET}"', "http:// or https:// URL"),
        (f'url = "https:///h"\nsecret = "{GOOD_SECRET}"', "with a host name"),
        ('url = "https://e.x/h"', "needs a secret"),
        (
            f'url = "http://127.0.0.1:8080/h"\nsecret = "{GOOD_SECRET}"',
            r"127\.0\.0\.1 \(loopback\)",
        ),
        (f'url = "http://169.254.169.254/"\nsecret = "{GOOD_SECRET}"', "metadata"),
        (f'url = "http://[::1]/h"\nsecret = "{GOOD_SECRET}"', "allow_private_network = true"),
        (
            f'url = "https://e.x/h"\nsecret = "{GOOD_SECRET}"\nsecret_env = "HOOK_SECRET"',
            "secret or secret_env, not both",
        ),
        ('url = "https://e.x/h"\nsecret_env = "HOOK_SECRET"', "HOOK_SECRET, which is not set"),
        (f'url = "https://e.x/h"\nsecret = "{GOOD_SECRET}"\nconcurrency = 0', "positive"),
        (f'url = "https://e.x/h"\nsecret = "{GOOD_SECRET}"\nrate_limit_per_s = -1', "positive"),
        (f'url = "https://e.x/h"\nsecret = "{GOOD_SECRET}"\nbackoff_initial_s = nan', "finite"),
        (f'url = "https://e.x/h"\nsecret = "{GOOD_SECRET}"\ntimeout_s = inf', "finite"),
        (
            f'url = "https://e.x/h"\nsecret = "{GOOD_SECRET}"\nbackoff_max_s = 1e12',
            r"backoff_max_s must be at most 2\.14748e\+06",
        ),
        (f'url = "https://e.x/h"\nsecret = "{GOOD_SECRET}"\nmax_attempts = 2147483648', "most"),
        (f'url = "http://0177.0.0.1/"\nsecret = "{GOOD_SECRET}"', "not a valid URL"),
        (f'url = "http://[::1/h"\nsecret = "{GOOD_SECRET}"', "not a valid URL"),
    ],
)
def test_bad_webhook_routes_are_config_errors(
    toml: Callable[[str], str], lines: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings({}, {}, toml(f"{HOOK}{lines}\n"))


def test_private_targets_are_allowed_when_the_route_says_so(toml: Callable[[str], str]) -> None:
    text = f'{HOOK}url = "http://127.0.0.1:8080/h"\nsecret = "{GOOD_SECRET}"\n'
    settings = load_settings({}, {}, toml(text + "allow_private_network = true\n"))
    assert settings.routes[0].allow_private_network


def test_secret_env_keeps_the_secret_out_of_the_file(toml: Callable[[str], str]) -> None:
    text = f'{HOOK}url = "https://e.x/h"\nsecret_env = "HOOK_SECRET"\n'
    settings = load_settings({}, {"HOOK_SECRET": GOOD_SECRET}, toml(text))
    (route,) = settings.routes
    assert route.secret == GOOD_SECRET
    assert GOOD_SECRET not in repr(route) and GOOD_SECRET not in repr(settings)
    assert signing_keys(route) == (b"secret-secret-secret-secret",)


def test_a_malformed_secret_is_refused_when_the_relay_starts_without_echoing_it() -> None:
    route = Route(name="hook", topics=("x",), sink="webhook", url="https://e.x", secret="whsec_%%")
    with pytest.raises(ConfigError, match="secret #1 is not valid") as info:
        signing_keys(route)
    assert "%%" not in str(info.value)
