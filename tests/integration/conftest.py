"""Fixtures shared by the relay's integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from tests.harness.relay import migrate, sa_engine


@pytest.fixture
def url(database_url: str) -> str:
    """A fresh database with the outbox schema migrated."""
    return migrate(database_url)


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    """A SQLAlchemy engine on ``url``, disposed after the test."""
    sa = sa_engine(url)
    yield sa
    sa.dispose()
