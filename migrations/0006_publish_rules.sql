-- outbox-relay schema, version 6: one set of rules at every door.
--
--   publish()  refuses what outbox_lib.publish refuses, in the same words: a topic longer than
--              255 characters or holding whitespace (as Python's str.isspace) or a control
--              character, an empty header name, a header the relay sets itself
--              (idempotency-key, outbox-message-id, outbox-topic, in any case), an
--              idempotency key longer than 512 characters or holding a control character
--              (it travels as the webhook-id and idempotency-key headers)

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
