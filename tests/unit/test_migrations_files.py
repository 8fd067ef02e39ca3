"""The migrations shipped with the code, the advisory-lock key and the history check."""

from __future__ import annotations

import pytest

from outbox_lib import MigrationError, available_migrations
from outbox_lib._migrate import Migration, _check_history, lock_key


def test_available_migrations_are_versions_one_to_n_in_order() -> None:
    migrations = available_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "core"
    assert all(m.sql.strip() for m in migrations)


def test_checksum_is_the_sha256_of_the_sql_and_changes_with_it() -> None:
    a = Migration(1, "core", "CREATE TABLE t ()")
    assert len(a.checksum) == 64
    assert a.checksum == Migration(1, "other", "CREATE TABLE t ()").checksum
    assert a.checksum != Migration(1, "core", "CREATE TABLE t (x int)").checksum


def test_lock_key_is_stable_across_releases() -> None:
    # Old and new relays migrating at once must take the same lock: this value never changes.
    assert lock_key("outbox") == 3048983324387197366


def test_lock_key_differs_per_schema_and_fits_bigint() -> None:
    keys = {lock_key(s) for s in ("outbox", "other", "Outbox", "outbox2")}
    assert len(keys) == 4
    assert all(-(2**63) <= k < 2**63 for k in keys)


def _known() -> list[Migration]:
    return [Migration(1, "core", "CREATE TABLE a ()"), Migration(2, "more", "CREATE TABLE b ()")]


def test_history_that_matches_or_lags_the_code_is_accepted() -> None:
    known = _known()
    _check_history({}, known)
    _check_history({1: known[0].checksum}, known)
    _check_history({m.version: m.checksum for m in known}, known)


def test_edited_migration_is_reported() -> None:
    known = _known()
    applied = {1: known[0].checksum, 2: "0" * 64}
    with pytest.raises(MigrationError, match=r"0002_more\.sql differs"):
        _check_history(applied, known)


def test_database_newer_than_the_code_is_reported() -> None:
    known = _known()
    applied = {1: known[0].checksum, 2: known[1].checksum, 3: "x", 4: "y"}
    with pytest.raises(MigrationError, match=r"version 4, newer than .*up to 2"):
        _check_history(applied, known)
