"""Database URLs: both contract forms normalised for psycopg; passwords never shown."""

from __future__ import annotations

import pytest

from outbox_lib import ConfigurationError
from relay.db import redact, to_libpq
from relay.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "libpq"),
    [
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
        ("postgres://u@h/db", "postgresql://u@h/db"),
        ("postgresql+psycopg://u:pw@h/db", "postgresql://u:pw@h/db"),
        ("postgresql+asyncpg://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("POSTGRESQL+PSYCOPG://u@h/db", "postgresql://u@h/db"),
        ("postgresql:///db?host=/var/run/postgresql", "postgresql:///db?host=/var/run/postgresql"),
        (
            "postgresql+psycopg://u@/db?host=/tmp/pg%20sock&port=5433",
            "postgresql://u@/db?host=/tmp/pg%20sock&port=5433",
        ),
    ],
)
def test_to_libpq_accepts_both_forms(url: str, libpq: str) -> None:
    assert to_libpq(url) == libpq


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:hunter2@h/db",
        "sqlite:///x.db",
        "host=localhost dbname=x",
        "postgresqlx://u@h/db",
        "",
    ],
)
def test_to_libpq_rejects_other_urls_without_leaking_the_password(url: str) -> None:
    with pytest.raises(ConfigError, match="must start with postgresql://") as exc:
        to_libpq(url)
    assert isinstance(exc.value, ConfigurationError)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://alice:s3cret@db.example:5432/app",
            "postgresql://alice:***@db.example:5432/app",
        ),
        ("postgresql+psycopg://alice:p@ss:w0rd@h/db", "postgresql+psycopg://alice:***@h/db"),
        ("postgresql://:s3cret@h/db", "postgresql://:***@h/db"),
        ("postgresql://alice@h/db", "postgresql://alice@h/db"),
        ("postgresql:///db?host=/tmp", "postgresql:///db?host=/tmp"),
    ],
)
def test_redact_hides_the_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_redact_of_an_unparseable_url_shows_nothing_of_it() -> None:
    assert redact("postgresql://u:s3cret@[::1/db") == "<unparseable URL>"


def test_redact_hides_a_password_query_parameter() -> None:
    assert "s3cret" not in redact("postgresql://u@h/db?sslmode=require&password=s3cret")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://u:pw@h/db?sslpassword=key-pw&passfile=/run/pgpass&sslmode=require",
            "postgresql://u:***@h/db?sslpassword=***&passfile=***&sslmode=require",
        ),
        (
            "host=127.0.0.1 port=1 user=u password=SECRET dbname=shop",
            "host=127.0.0.1 port=1 user=u password=*** dbname=shop",
        ),
        ("host=h password = 'two words \\' quoted' dbname=x", "host=h password=*** dbname=x"),
        ("host=h PASSWORD='never closed", "host=h PASSWORD=***"),
        ("sslpassword=a passfile=/p user=u", "sslpassword=*** passfile=*** user=u"),
        ("host=h password=a://b", "host=h password=***"),
    ],
)
def test_redact_hides_every_secret_in_both_forms(url: str, shown: str) -> None:
    """URL and libpq key=value strings alike: the password, the client key's password and
    the password file's path."""
    assert redact(url) == shown


def test_a_key_value_string_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigError) as exc:
        to_libpq("host=127.0.0.1 user=u password=SECRET dbname=shop")
    assert "SECRET" not in str(exc.value) and "password=***" in str(exc.value)
