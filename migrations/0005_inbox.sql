-- outbox-relay schema, version 5: the consumer side, an inbox.
--
--   inbox          one row per (consumer, idempotency key) a consumer has processed. The
--                  consumer writes it in the same transaction as its business write, so a
--                  redelivered message finds its row and is skipped; a rolled-back attempt
--                  leaves no row and the redelivery is processed
--   inbox_accept() the one write path, for outbox_lib.inbox and for non-Python consumers:
--                  true when this transaction is the first to accept the key (do the work),
--                  false when a committed transaction already did (skip it). A concurrent
--                  transaction holding the same key makes it wait for that one's outcome
--   inbox_accepted_idx  lets `outbox-relay purge --inbox-older-than` find old rows cheaply

CREATE TABLE inbox (
    consumer        text        NOT NULL,
    idempotency_key text        NOT NULL,
    accepted_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, idempotency_key)
);

CREATE INDEX inbox_accepted_idx ON inbox (accepted_at);

CREATE FUNCTION inbox_accept(consumer text, idempotency_key text) RETURNS boolean
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
