-- Reverses 0009_log_first_pass.sql. Lossless: the first pass deletes what it finished and
-- marks fanned what it queued, so the rows it has not passed yet are exactly those not
-- fanned, which is what a relay of format 1 claims.

DROP TABLE first_pass;
DELETE FROM tick;
ALTER TABLE message ADD COLUMN claimed_by text, ADD COLUMN claimed_until timestamptz;

CREATE OR REPLACE FUNCTION relay_format() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$ SELECT 1 $$;
