-- Reverses 0006_publish_rules.sql: publish() as version 1 made it.

-- Public SQL entry point for triggers and non-Python writers (see CONTRACT section 2).
-- The payload limit is the setting `outbox.max_payload_bytes` (default 1 MiB).
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
