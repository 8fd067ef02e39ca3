-- outbox-relay schema, version 7: deduplication is per topic, end to end.
--
--   publish()       an idempotency key must be printable ASCII (U+0020 to U+007E) with no
--                   space at either end: it travels as an HTTP header value (webhook-id,
--                   idempotency-key), which cannot carry other characters and loses spaces at
--                   its ends. Keys already stored are left as they are. Every header name
--                   beginning with outbox- (any ASCII case) is the relay's, as idempotency-key is:
--                   webhooks now carry outbox-topic-signature, and later headers get the
--                   same protection
--   inbox.topic     the outbox topic a consumer accepted a key for. Idempotency keys are
--                   unique per topic, so the inbox now records (consumer, key, topic): two
--                   messages of different topics with one key are two effects. Rows written
--                   before this version have topic '' and still stand for every topic
--   inbox_accept(consumer, idempotency_key, topic)
--                   true when this transaction is the first to accept the key for that topic
--                   (and no row of version 6 or before, topic '', holds the key). The
--                   two-argument form stays, meaning what it meant: one acceptance per key,
--                   whatever the topic (it is false when any row holds the key)
--   relay_format()  the way of claiming and recording messages this schema serves (1: the
--                   delete-and-claim first pass). A relay checks it at start and at every
--                   heartbeat, and stops when the schema serves a format it does not speak,
--                   so a migration that changes the first pass stops older relays safely

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
        SELECT h.key INTO v_bad
          FROM jsonb_each(headers) AS h,
               translate(h.key, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') AS lowered
         WHERE lowered = 'idempotency-key' OR starts_with(lowered, 'outbox-') LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.publish: header % is reserved: the relay sets idempotency-key and outbox-* headers',
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
    IF idempotency_key !~ '^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$' THEN
        RAISE EXCEPTION 'outbox.publish: idempotency_key % must be printable ASCII with no space at either end; it travels as an HTTP header (webhook-id, idempotency-key)',
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

ALTER TABLE inbox ADD COLUMN topic text NOT NULL DEFAULT '';
ALTER TABLE inbox DROP CONSTRAINT inbox_pkey;
-- Key first: the two-argument form and the check for rows without a topic look up by key.
ALTER TABLE inbox ADD PRIMARY KEY (consumer, idempotency_key, topic);

CREATE FUNCTION inbox_accept(consumer text, idempotency_key text, topic text) RETURNS boolean
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_topic text := coalesce(inbox_accept.topic, '');
BEGIN
    IF consumer IS NULL OR consumer = '' OR length(consumer) > 200 THEN
        RAISE EXCEPTION 'outbox.inbox_accept: consumer must be a non-empty string of at most 200 characters'
            USING ERRCODE = '22023';
    END IF;
    IF idempotency_key IS NULL OR idempotency_key = '' OR length(idempotency_key) > 512 THEN
        RAISE EXCEPTION 'outbox.inbox_accept: idempotency_key must be a non-empty string of at most 512 characters'
            USING ERRCODE = '22023';
    END IF;
    IF length(v_topic) > 255 THEN
        RAISE EXCEPTION 'outbox.inbox_accept: topic is longer than 255 characters'
            USING ERRCODE = '22023';
    END IF;
    -- A row without a topic (the two-argument form, or version 6 and before) holds the key
    -- for every topic; the two-argument form is held by a row of any topic.
    IF EXISTS (SELECT 1 FROM inbox i
                WHERE i.consumer = inbox_accept.consumer
                  AND i.idempotency_key = inbox_accept.idempotency_key
                  AND (i.topic = '' OR v_topic = '')) THEN
        RETURN false;
    END IF;
    INSERT INTO inbox AS i (consumer, idempotency_key, topic)
    VALUES (inbox_accept.consumer, inbox_accept.idempotency_key, v_topic)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION inbox_accept(consumer text, idempotency_key text) RETURNS boolean
LANGUAGE sql
SET search_path FROM CURRENT
AS $$ SELECT inbox_accept(inbox_accept.consumer, inbox_accept.idempotency_key, NULL::text) $$;

CREATE FUNCTION relay_format() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$ SELECT 1 $$;
