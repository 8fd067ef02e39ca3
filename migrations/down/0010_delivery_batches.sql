-- Reverses 0010_delivery_batches.sql. Lossless: version 9's table comes back with the
-- records it held, and every message of every batch becomes one row of it again, with its
-- batch's delivered_at.

DROP VIEW delivery;
DROP FUNCTION delivery_read_only();

ALTER TABLE delivery_row RENAME TO delivery;

INSERT INTO delivery (message_id, seq, route, topic, msg_key, payload, content_type, headers,
                      idempotency_key, created_at, delivered_at, attempts, kafka_partition,
                      kafka_offset)
SELECT d.message_id, d.seq, b.route, d.topic, d.msg_key, d.payload, d.content_type, d.headers,
       d.idempotency_key, d.created_at, b.delivered_at, d.attempts, d.kafka_partition,
       d.kafka_offset
  FROM delivery_batch b
 CROSS JOIN LATERAL unnest(b.message_id, b.seq, b.topic, b.msg_key, b.payload, b.content_type,
                           b.headers, b.idempotency_key, b.created_at, b.attempts,
                           b.kafka_partition, b.kafka_offset)
       AS d(message_id, seq, topic, msg_key, payload, content_type, headers, idempotency_key,
            created_at, attempts, kafka_partition, kafka_offset)
 ORDER BY b.batch_id, d.seq;

DROP TABLE delivery_batch;

CREATE OR REPLACE FUNCTION relay_format() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$ SELECT 2 $$;
