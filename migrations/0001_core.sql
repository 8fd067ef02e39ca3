-- outbox-relay schema, version 1.
--
-- The migrator runs this file inside one transaction with
-- `SET LOCAL search_path TO <schema>, pg_catalog, pg_temp`, so every name below lands in
-- the configured schema; functions pin that path with `SET search_path FROM CURRENT`
-- (pg_temp last, so a session's temporary table can never shadow an outbox table).
--
-- Tables:
--   message        the hot table: committed, not yet complete work, one row per message
--   route_pending  per-(message, route) state for routes that need another pass
--                  (retry after backoff, parked behind an earlier message of the key)
--   delivery       append-only log of acknowledged deliveries (one row per message and route)
--   dead_letter    deliveries given up on, with a full copy of the message so they can be retried
--   idempotency    (topic, idempotency_key) -> message id, outlives delivery

CREATE TABLE message (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    topic           text        NOT NULL,
    msg_key         bytea,
    payload         bytea       NOT NULL,
    content_type    text        NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key text,
    bucket          smallint    NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Lease of the relay that claimed the row for its first pass over every route.
    -- Not indexed, so claiming is a HOT update.
    claimed_by      text,
    claimed_until   timestamptz,
    -- true once the first pass is over and some route still has a route_pending row
    fanned          boolean     NOT NULL DEFAULT false,
    CONSTRAINT message_topic_valid CHECK (topic <> '' AND length(topic) <= 255),
    CONSTRAINT message_bucket_valid CHECK (bucket BETWEEN 0 AND 255)
) WITH (fillfactor = 80);

-- Head-of-key checks: "is an earlier message of this topic and key still in flight?"
CREATE INDEX message_key_idx ON message (topic, msg_key, seq) WHERE msg_key IS NOT NULL;

ALTER TABLE message SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

CREATE TABLE route_pending (
    seq           bigint      NOT NULL,
    route         text        NOT NULL,
    topic         text        NOT NULL,
    msg_key       bytea,
    attempts      integer     NOT NULL DEFAULT 0,
    available_at  timestamptz NOT NULL DEFAULT now(),
    claimed_by    text,
    claimed_until timestamptz,
    last_error    text,
    PRIMARY KEY (seq, route)
);

CREATE INDEX route_pending_key_idx ON route_pending (route, topic, msg_key, seq);
CREATE INDEX route_pending_due_idx ON route_pending (available_at);

CREATE TABLE delivery (
    message_id      uuid        NOT NULL,
    seq             bigint      NOT NULL,
    route           text        NOT NULL,
    topic           text        NOT NULL,
    msg_key         bytea,
    payload         bytea       NOT NULL,
    content_type    text        NOT NULL,
    headers         jsonb       NOT NULL,
    idempotency_key text,
    created_at      timestamptz NOT NULL,
    delivered_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts        integer     NOT NULL,
    kafka_partition integer,
    kafka_offset    bigint
);

CREATE INDEX delivery_delivered_at_idx ON delivery USING brin (delivered_at);
CREATE INDEX delivery_message_idx ON delivery (message_id);

CREATE TABLE dead_letter (
    message_id      uuid        NOT NULL,
    seq             bigint      NOT NULL,
    route           text        NOT NULL,
    topic           text        NOT NULL,
    msg_key         bytea,
    payload         bytea       NOT NULL,
    content_type    text        NOT NULL,
    headers         jsonb       NOT NULL,
    idempotency_key text,
    bucket          smallint    NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer     NOT NULL,
    reason          text        NOT NULL,
    last_error      text,
    dead_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (message_id, route)
);

CREATE INDEX dead_letter_topic_idx ON dead_letter (topic, dead_at);

CREATE TABLE idempotency (
    topic           text        NOT NULL,
    idempotency_key text        NOT NULL,
    message_id      uuid        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, idempotency_key)
);

-- The bucket a key hashes to; stable across PostgreSQL versions (sha256, not hashtext).
CREATE FUNCTION key_bucket(k bytea) RETURNS smallint
LANGUAGE sql VOLATILE
SET search_path FROM CURRENT
AS $$
    SELECT CASE WHEN k IS NULL THEN floor(random() * 256)::smallint
                ELSE get_byte(sha256(k), 0)::smallint END
$$;

-- Wake listening relays at most once per transaction and schema: the flag is a
-- transaction-local setting named after the schema.
CREATE FUNCTION notify_once() RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_flag text := 'outbox_notified.' || current_schema();
BEGIN
    IF coalesce(current_setting(v_flag, true), '') <> '1' THEN
        PERFORM set_config(v_flag, '1', true);
        PERFORM pg_notify(current_schema() || '_wakeup', '');
    END IF;
END
$$;

-- The one write path: used by outbox_lib.publish and by the public publish() below.
CREATE FUNCTION enqueue(
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

-- Public SQL entry point for triggers and non-Python writers (see CONTRACT section 2).
-- The payload limit is the setting `outbox.max_payload_bytes` (default 1 MiB).
CREATE FUNCTION publish(
    topic text,
    payload jsonb,
    key text DEFAULT NULL,
    headers jsonb DEFAULT NULL,
    idempotency_key text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_body bytea;
    v_limit bigint := coalesce(nullif(current_setting('outbox.max_payload_bytes', true), '')::bigint,
                               1048576);
    v_bad text;
BEGIN
    IF payload IS NULL THEN
        RAISE EXCEPTION 'outbox.publish: payload must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF headers IS NOT NULL THEN
        IF jsonb_typeof(headers) <> 'object' THEN
            RAISE EXCEPTION 'outbox.publish: headers must be a JSON object of string values, got %',
                jsonb_typeof(headers) USING ERRCODE = '22023';
        END IF;
        SELECT h.key INTO v_bad FROM jsonb_each(headers) AS h
         WHERE jsonb_typeof(h.value) <> 'string' LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.publish: header % must be a string', v_bad USING ERRCODE = '22023';
        END IF;
    END IF;
    IF idempotency_key = '' THEN
        RAISE EXCEPTION 'outbox.publish: idempotency_key must not be empty' USING ERRCODE = '22023';
    END IF;
    v_body := convert_to(payload::text, 'UTF8');
    IF octet_length(v_body) > v_limit THEN
        RAISE EXCEPTION 'outbox.publish: payload is % bytes, over the limit of % bytes',
            octet_length(v_body), v_limit USING ERRCODE = '54000';
    END IF;
    RETURN enqueue(publish.topic, v_body, 'application/json', convert_to(publish.key, 'UTF8'),
                   publish.headers, publish.idempotency_key);
END
$$;
