-- outbox-relay schema, version 4: lag you can read cheaply, dead letters you can discard.
--
--   message_topic_idx     per topic, the oldest pending message and the pending count are
--                         read from this index (a skip scan over topics, then one index
--                         range per topic), so the relays' lag gauges never scan the table.
--                         Publishes wait while it builds: about a second per million rows
--                         pending at upgrade time
--   dead_letter.discarded_at
--                         `outbox-relay dead-letters discard` keeps the letter (for audit)
--                         but takes it out of the counts, lists and retries; `purge` deletes
--                         discarded letters once they are older than its cut-off
--   dead_letter_live_idx  the dead-letter gauge per (topic, route) counts live letters
--                         with an index-only scan

CREATE INDEX message_topic_idx ON message (topic, created_at);

ALTER TABLE dead_letter ADD COLUMN discarded_at timestamptz;
ALTER TABLE dead_letter ADD COLUMN discarded_reason text;

CREATE INDEX dead_letter_live_idx ON dead_letter (topic, route) WHERE discarded_at IS NULL;
CREATE INDEX dead_letter_discarded_idx ON dead_letter (discarded_at)
    WHERE discarded_at IS NOT NULL;
