-- Reverses 0004_observability.sql. Drops which dead letters were discarded: after an upgrade
-- back, discarded letters count, list and retry like live ones again.

DROP INDEX dead_letter_discarded_idx;
DROP INDEX dead_letter_live_idx;
ALTER TABLE dead_letter DROP COLUMN discarded_reason;
ALTER TABLE dead_letter DROP COLUMN discarded_at;
DROP INDEX message_topic_idx;
