-- outbox-relay schema, version 8: the ground of the log-shaped first pass
-- (docs/first-pass-log.md). Additive: relays of format 1 run on it unchanged.
--
--   message.xid   the transaction that wrote the message (pg_current_xact_id(), the
--                 top-level one inside a savepoint too). NULL for rows written before this
--                 version: those committed long ago. Added without a default first, so the
--                 table is not rewritten; only new rows get one
--   message_xid_idx
--                 finds the rows of the transactions a snapshot saw running: what commits
--                 late is read by its transaction, never by walking the table
--   tick          recorded snapshots, insert-only. lo is the message sequence's last value
--                 read before the snapshot, hi the one read after it: every row the snapshot
--                 sees has seq <= hi, and every row of a transaction that starts after it has
--                 seq > lo. xnext is a transaction id taken after the snapshot: every
--                 transaction running at the snapshot has a lower one. (The snapshot's own
--                 xip list does not name them all: a transaction at or above its xmax is not
--                 listed, though it may be running.) take_tick() serializes ticks, so a later
--                 tick_id has a later snapshot
--   take_tick()   records one tick and returns it
--   enqueue()     takes the transaction's id before the message's seq. A row's default
--                 would take them the other way round, and a transaction that got its seq
--                 just before a tick's lo and its id just after the tick's snapshot would
--                 be in no batch: neither running at the tick nor above its lo. Messages
--                 are written through enqueue() only (outbox_lib.publish, outbox.publish)

ALTER TABLE message ADD COLUMN xid xid8;
ALTER TABLE message ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX message_xid_idx ON message (xid);

CREATE TABLE tick (
    tick_id  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snap     pg_snapshot NOT NULL,
    lo       bigint      NOT NULL,
    hi       bigint      NOT NULL,
    xnext    xid8        NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT tick_bounds_valid CHECK (lo <= hi)
);

-- The message sequence's last value (0 before the first message). Sequences are not
-- transactional: this sees every value handed out, committed or not.
CREATE FUNCTION message_seq_last() RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path FROM CURRENT
AS $$
    SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('message', 'seq')::regclass), 0)
$$;

-- One tick: lo is read before the statement that takes the snapshot (READ COMMITTED takes
-- one per statement); hi and xnext (this transaction's own id, taken here and not before)
-- during it, after the snapshot. Call it in a transaction of its own
-- (autocommit): the lock that orders ticks is held until that transaction ends.
CREATE FUNCTION take_tick() RETURNS SETOF tick
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_lo bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'outbox.take_tick: needs READ COMMITTED (one snapshot per statement)'
            USING ERRCODE = '25000';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('outbox.take_tick ' || current_schema(), 0));
    v_lo := message_seq_last();
    RETURN QUERY EXECUTE
        'INSERT INTO tick (snap, lo, hi, xnext) '
        'SELECT pg_current_snapshot(), $1, message_seq_last(), pg_current_xact_id() '
        'RETURNING *' USING v_lo;
END
$$;

CREATE OR REPLACE FUNCTION enqueue(
    p_topic text,
    p_payload bytea,
    p_content_type text,
    p_key bytea,
    p_headers jsonb,
    p_idempotency_key text
) RETURNS uuid
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_id uuid := gen_random_uuid();
    v_existing uuid;
BEGIN
    -- The transaction id first, the message's seq after it: a snapshot that does not list
    -- this transaction as running then never sees a seq of it below its lo.
    PERFORM pg_current_xact_id();
    IF p_topic IS NULL OR p_topic = '' THEN
        RAISE EXCEPTION 'outbox: topic must be a non-empty string'
            USING ERRCODE = '22023';
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        INSERT INTO idempotency (topic, idempotency_key, message_id)
        VALUES (p_topic, p_idempotency_key, v_id)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT message_id INTO v_existing FROM idempotency
             WHERE topic = p_topic AND idempotency_key = p_idempotency_key;
            IF v_existing IS NULL THEN
                RAISE EXCEPTION 'outbox: idempotency key % of topic % is being published concurrently',
                    p_idempotency_key, p_topic USING ERRCODE = '40001';
            END IF;
            RETURN v_existing;
        END IF;
    END IF;
    INSERT INTO message (id, topic, msg_key, payload, content_type, headers, idempotency_key, bucket)
    VALUES (v_id, p_topic, p_key, p_payload, p_content_type, coalesce(p_headers, '{}'::jsonb),
            p_idempotency_key, key_bucket(p_key));
    PERFORM notify_once();
    RETURN v_id;
END
$$;
