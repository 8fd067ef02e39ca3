-- SQL of the migration runner. {schema} is replaced by the quoted schema identifier, the
-- other {names} by SQL literals (psycopg.sql.Literal), so that every statement can also be
-- written out as a script (Alembic's offline mode) without bound parameters.

-- name: lock
SELECT pg_advisory_xact_lock({key})

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {schema}

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migrations_table_exists
SELECT to_regclass(format('%%I.schema_migrations', %(schema)s::text)) IS NOT NULL

-- name: applied
SELECT version, checksum FROM {schema}.schema_migrations ORDER BY version

-- name: set_search_path
SET LOCAL search_path TO {schema}, pg_catalog, pg_temp

-- name: record
INSERT INTO {schema}.schema_migrations (version, name, checksum)
VALUES ({version}, {name}, {checksum})

-- name: unrecord
DELETE FROM {schema}.schema_migrations WHERE version = {version}

-- name: save_search_path
-- The migrations run under `SET LOCAL search_path`; a caller whose transaction goes on
-- (an Alembic run) gets its own path back afterwards. Kept in a transaction-local setting so
-- that a script written offline can do the same.
SELECT set_config('outbox_relay.saved_search_path', current_setting('search_path'), true)

-- name: restore_search_path
SELECT set_config('search_path', current_setting('outbox_relay.saved_search_path'), true)

-- name: expect_version
-- A script written offline assumes the version the schema is at; it stops if it is not.
DO $$
BEGIN
    IF (SELECT coalesce(max(version), 0) FROM {schema}.schema_migrations) <> {version} THEN
        RAISE EXCEPTION 'outbox schema % is not at version %, which this script was written for',
            {schema_name}, {version}
            USING HINT = 'run the migration online, or regenerate the script from the right revision';
    END IF;
END
$$

-- name: drop_migrations_table
-- Downgrading below version 1: the history table, then the schema.
DROP TABLE {schema}.schema_migrations

-- name: drop_schema
-- RESTRICT (the default), so that objects an application put into the schema stop the
-- downgrade instead of being dropped with it.
DROP SCHEMA {schema} RESTRICT
