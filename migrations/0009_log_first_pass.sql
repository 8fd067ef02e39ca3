-- outbox-relay schema, version 9: the first pass reads the outbox as a log
-- (docs/first-pass-log.md). Relays of first-pass format 1 stop on it (relay_format() says 2;
-- they re-check it at every heartbeat, and the columns their claim reads are gone).
--
--   first_pass     the cursor of the first pass, insert-only: its newest row is the
--                  position, the batch between ticks start_tick and end_tick (NULL: none
--                  open yet) read up to after_seq. The relay holding bucket 0 reads the batch
--                  and, in the transaction that records what it sent, inserts the next
--                  position after the one it started from: prev_id is unique, so of two
--                  relays moving from one position only one can, and only the holder of
--                  bucket 0 with a live lease may. A batch done, its end becomes the next
--                  start. Nothing is updated per batch, so a long transaction elsewhere
--                  leaves no version chain to walk; the replaced row is deleted by its id
--   the seed tick  '1:1:' sees no transaction at all, with lo = hi = 0: the first batch
--                  after it is every message committed by then (those written before
--                  version 8 have no xid and count as committed long ago), so whatever
--                  was pending before this migration is read once by the new pass
--   message.claimed_by, message.claimed_until
--                  dropped: nothing claims a message row any more. Rows an old relay had
--                  leased and not recorded are read again (at-least-once)

ALTER TABLE message DROP COLUMN claimed_by, DROP COLUMN claimed_until;

-- Ticks of version 8 belong to no cursor.
DELETE FROM tick;

CREATE TABLE first_pass (
    position_id bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    prev_id     bigint      UNIQUE,
    start_tick  bigint      NOT NULL,
    end_tick    bigint,
    after_seq   bigint      NOT NULL DEFAULT 0,
    relay_id    text,
    moved_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT first_pass_batch_valid CHECK (end_tick IS NULL OR end_tick > start_tick)
);

WITH seed AS (
    INSERT INTO tick (snap, lo, hi, xnext) VALUES ('1:1:', 0, 0, '1') RETURNING tick_id
)
INSERT INTO first_pass (start_tick) SELECT tick_id FROM seed;

CREATE OR REPLACE FUNCTION relay_format() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$ SELECT 2 $$;
