-- Reverses 0008_snapshot_ticks.sql.

DROP FUNCTION take_tick();
DROP FUNCTION message_seq_last();
DROP TABLE tick;
DROP INDEX message_xid_idx;
ALTER TABLE message DROP COLUMN xid;

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
