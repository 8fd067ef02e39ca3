-- Reverses 0001_core.sql: drops every message, delivery record, dead letter and idempotency
-- key. No CASCADE anywhere: a view or foreign key of the application's own that depends on
-- an outbox table stops the downgrade instead of disappearing with it.

DROP FUNCTION publish(text, jsonb, text, jsonb, text);
DROP FUNCTION enqueue(text, bytea, text, bytea, jsonb, text);
DROP FUNCTION notify_once();
DROP FUNCTION key_bucket(bytea);
DROP TABLE idempotency;
DROP TABLE dead_letter;
DROP TABLE delivery;
DROP TABLE route_pending;
DROP TABLE message;
