-- Reverses 0007_dedup_scope.sql: publish() and the inbox as version 6 made them. Where one
-- consumer accepted a key for several topics, one row per (consumer, key) is kept.

CREATE OR REPLACE FUNCTION publish(
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
    IF topic IS NULL OR topic = '' THEN
        RAISE EXCEPTION 'outbox.publish: topic must not be empty' USING ERRCODE = '22023';
    END IF;
    IF length(topic) > 255 THEN
        RAISE EXCEPTION 'outbox.publish: topic is longer than 255 characters' USING ERRCODE = '22023';
    END IF;
    IF topic ~ '[\x01-\x20\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]' THEN
        RAISE EXCEPTION 'outbox.publish: topic % contains whitespace or control characters',
            quote_literal(topic) USING ERRCODE = '22023';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'outbox.publish: payload must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF headers IS NOT NULL THEN
        IF jsonb_typeof(headers) <> 'object' THEN
            RAISE EXCEPTION 'outbox.publish: headers must be a JSON object of string values, got %',
                jsonb_typeof(headers) USING ERRCODE = '22023';
        END IF;
        IF headers ? '' THEN
            RAISE EXCEPTION 'outbox.publish: header names must be non-empty' USING ERRCODE = '22023';
        END IF;
        SELECT h.key INTO v_bad FROM jsonb_each(headers) AS h
         WHERE lower(h.key) IN ('idempotency-key', 'outbox-message-id', 'outbox-topic') LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.publish: header % is reserved: the relay sets it',
                quote_literal(v_bad) USING ERRCODE = '22023';
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
    IF length(idempotency_key) > 512 THEN
        RAISE EXCEPTION 'outbox.publish: idempotency_key is longer than 512 characters'
            USING ERRCODE = '22023';
    END IF;
    IF idempotency_key ~ '[\x01-\x1f\x7f]' THEN
        RAISE EXCEPTION 'outbox.publish: idempotency_key % contains a control character; it travels as a header (webhook-id, idempotency-key)',
            quote_literal(idempotency_key) USING ERRCODE = '22023';
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

DROP FUNCTION relay_format();
DROP FUNCTION inbox_accept(text, text, text);
DELETE FROM inbox a USING inbox b
 WHERE a.consumer = b.consumer AND a.idempotency_key = b.idempotency_key AND a.topic > b.topic;
ALTER TABLE inbox DROP CONSTRAINT inbox_pkey;
ALTER TABLE inbox DROP COLUMN topic;
ALTER TABLE inbox ADD PRIMARY KEY (consumer, idempotency_key);

CREATE OR REPLACE FUNCTION inbox_accept(consumer text, idempotency_key text) RETURNS boolean
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    IF consumer IS NULL OR consumer = '' OR length(consumer) > 200 THEN
        RAISE EXCEPTION 'outbox.inbox_accept: consumer must be a non-empty string of at most 200 characters'
            USING ERRCODE = '22023';
    END IF;
    IF idempotency_key IS NULL OR idempotency_key = '' OR length(idempotency_key) > 512 THEN
        RAISE EXCEPTION 'outbox.inbox_accept: idempotency_key must be a non-empty string of at most 512 characters'
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO inbox AS i (consumer, idempotency_key)
    VALUES (inbox_accept.consumer, inbox_accept.idempotency_key)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;
