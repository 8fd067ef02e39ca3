-- SQL of the migration runner. {schema} is replaced by the quoted schema identifier.

-- name: lock
SELECT pg_advisory_xact_lock(%(key)s)

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
VALUES (%(version)s, %(name)s, %(checksum)s)
