-- outbox-relay schema, version 10: the delivery log is written a batch at a time
-- (docs/design.md). Relays of first-pass format 2 stop on it: their record inserts into
-- delivery, which now refuses writes with an error they do not retry (nothing of that record
-- is kept, so what they sent is sent again), and relay_format() says 3 at their heartbeat.
--
--   delivery_batch one row per route per record transaction: the messages that route
--                  acknowledged, column by column, each an array in the same order (the
--                  i-th element of every array is one message). A record of 1,000 messages
--                  writes one row and its TOAST chunks, compressed, where version 9 wrote
--                  1,000 rows, each with its payload and its index entries: the record
--                  writes a fifth of the WAL. delivered_at is the batch's
--   delivery_row   version 9's table, renamed, not copied (the migration takes no longer on
--                  a long log): the records written before this version. Nothing adds to
--                  it; purge empties it as its records age
--   delivery       a view with the columns and meaning of version 9's table, one row per
--                  message and route: the batches unnested, then delivery_row. A filter on
--                  route or delivered_at applies to the batches before they are unnested; a
--                  lookup by message id reads the id arrays (docs/operations.md, Replay)
--   purge          deletes whole batches: one row per up to batch_size deliveries
--
-- A record of an old relay racing the rename either commits before it (into what becomes
-- delivery_row) or, once it runs, meets the view and fails whole.

ALTER TABLE delivery RENAME TO delivery_row;

CREATE TABLE delivery_batch (
    batch_id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route           text        NOT NULL,
    delivered_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    message_id      uuid[]      NOT NULL,
    seq             bigint[]    NOT NULL,
    topic           text[]      NOT NULL,
    msg_key         bytea[]     NOT NULL,
    payload         bytea[]     NOT NULL,
    content_type    text[]      NOT NULL,
    headers         jsonb[]     NOT NULL,
    idempotency_key text[]      NOT NULL,
    created_at      timestamptz[] NOT NULL,
    attempts        integer[]   NOT NULL,
    kafka_partition integer[]   NOT NULL,
    kafka_offset    bigint[]    NOT NULL,
    CONSTRAINT delivery_batch_aligned CHECK (
        cardinality(seq) = cardinality(message_id) AND cardinality(topic) = cardinality(message_id)
        AND cardinality(msg_key) = cardinality(message_id)
        AND cardinality(payload) = cardinality(message_id)
        AND cardinality(content_type) = cardinality(message_id)
        AND cardinality(headers) = cardinality(message_id)
        AND cardinality(idempotency_key) = cardinality(message_id)
        AND cardinality(created_at) = cardinality(message_id)
        AND cardinality(attempts) = cardinality(message_id)
        AND cardinality(kafka_partition) = cardinality(message_id)
        AND cardinality(kafka_offset) = cardinality(message_id))
);

CREATE INDEX delivery_batch_delivered_at_idx ON delivery_batch USING brin (delivered_at);
CREATE INDEX delivery_batch_route_idx ON delivery_batch (route, batch_id);

-- lz4 where the server has it: compressing a batch's payloads costs a tenth of pglz's time.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
                WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE delivery_batch
            ALTER COLUMN payload SET COMPRESSION lz4,
            ALTER COLUMN headers SET COMPRESSION lz4,
            ALTER COLUMN msg_key SET COMPRESSION lz4,
            ALTER COLUMN topic SET COMPRESSION lz4,
            ALTER COLUMN content_type SET COMPRESSION lz4,
            ALTER COLUMN idempotency_key SET COMPRESSION lz4;
    END IF;
END
$$;

CREATE VIEW delivery AS
SELECT d.message_id, d.seq, b.route, d.topic, d.msg_key, d.payload, d.content_type, d.headers,
       d.idempotency_key, d.created_at, b.delivered_at, d.attempts, d.kafka_partition,
       d.kafka_offset
  FROM delivery_batch b
 CROSS JOIN LATERAL unnest(b.message_id, b.seq, b.topic, b.msg_key, b.payload, b.content_type,
                           b.headers, b.idempotency_key, b.created_at, b.attempts,
                           b.kafka_partition, b.kafka_offset)
       AS d(message_id, seq, topic, msg_key, payload, content_type, headers, idempotency_key,
            created_at, attempts, kafka_partition, kafka_offset)
UNION ALL
SELECT message_id, seq, route, topic, msg_key, payload, content_type, headers, idempotency_key,
       created_at, delivered_at, attempts, kafka_partition, kafka_offset
  FROM delivery_row;

-- Writing the view is refused with an error no relay takes for an outage (SQLSTATE 0A000,
-- not class 08/53/55/57): a relay of the previous release, whose record inserts into
-- delivery, fails that record (nothing of it is kept) and exits at once, naming the fix,
-- instead of retrying it until its lease runs out.
CREATE FUNCTION delivery_read_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    RAISE EXCEPTION '%.delivery is a view from schema version 10 on: this outbox-relay is older than the schema; upgrade the relay (docs/operations.md, Upgrading)',
        quote_ident(TG_TABLE_SCHEMA)
        USING ERRCODE = 'feature_not_supported';
END
$$;

CREATE TRIGGER delivery_read_only INSTEAD OF INSERT OR UPDATE OR DELETE ON delivery
    FOR EACH ROW EXECUTE FUNCTION delivery_read_only();

CREATE OR REPLACE FUNCTION relay_format() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$ SELECT 3 $$;
