-- Every statement the benchmarks run. {schema}, {source} and {table} are replaced by quoted
-- identifiers (psycopg.sql.Identifier); values are always bound parameters.

-- name: create_schema
CREATE SCHEMA {schema}

-- name: drop_schema
DROP SCHEMA IF EXISTS {schema} CASCADE

-- name: create_backlog
-- The records every scenario sends, generated once: keys `customer-<n mod keys>`, an order as
-- JSON padded to exactly payload_bytes (its last field, "note", is filled with 'x'), two
-- application headers.
CREATE TABLE {schema}.backlog AS
SELECT o.n,
       gen_random_uuid() AS id,
       convert_to(o.customer, 'UTF8') AS msg_key,
       convert_to(rpad(left(o.doc, -2), greatest(%(payload_bytes)s, length(o.doc)) - 2, 'x')
                  || right(o.doc, 2), 'UTF8') AS payload,
       jsonb_build_object('tenant', 'acme', 'trace-id', md5(o.n::text)) AS headers
  FROM (SELECT i AS n,
               'customer-' || (i %% %(keys)s) AS customer,
               json_build_object('n', i, 'order_id', 1000000 + i,
                                 'customer', 'customer-' || (i %% %(keys)s),
                                 'amount_cents', (i * 7919) %% 100000, 'currency', 'EUR',
                                 'status', 'created', 'note', '')::text AS doc
          FROM generate_series(1, %(messages)s::bigint) AS i) AS o

-- name: read_backlog
SELECT count(*) FROM {schema}.backlog

-- name: backlog_records
SELECT id, msg_key, payload, headers FROM {source}.backlog WHERE n <= %(limit)s ORDER BY n

-- name: backlog_sizes
SELECT count(*), avg(octet_length(payload)), count(DISTINCT msg_key) FROM {source}.backlog
 WHERE n <= %(limit)s

-- name: load_outbox
-- What outbox_lib.publish would have written, in one statement (enqueue() row by row costs
-- ~100x more and is not what is measured here): backlog rows after..upto, one transaction.
-- Nothing prepares the table afterwards (no VACUUM, no ANALYZE): a drain meets it as an
-- application's commits leave it.
INSERT INTO {schema}.message (id, topic, msg_key, payload, content_type, headers, bucket)
SELECT b.id, %(topic)s, b.msg_key, b.payload, 'application/json', b.headers,
       {schema}.key_bucket(b.msg_key)
  FROM {source}.backlog AS b
 WHERE b.n > %(after)s AND b.n <= %(upto)s
 ORDER BY b.n

-- name: take_xid
SELECT pg_current_xact_id()

-- name: pin_snapshot
-- A session that keeps a snapshot open (what a long report or a forgotten transaction does):
-- run in a REPEATABLE READ transaction left open, it holds back the cluster's xmin, so
-- nothing deleted after it began can be vacuumed away.
SELECT count(*) FROM {schema}.message

-- name: checkpoint
CHECKPOINT

-- name: wal_lsn
SELECT pg_current_wal_lsn()

-- name: wal_bytes_since
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %(lsn)s::pg_lsn)

-- name: outbox_counts
SELECT (SELECT count(*) FROM {schema}.message),
       (SELECT count(*) FROM {schema}.delivery),
       (SELECT count(DISTINCT message_id) FROM {schema}.delivery)

-- name: naive_claim
SELECT seq, id, topic, msg_key, payload, headers
  FROM {schema}.message
 ORDER BY seq
 LIMIT 1
   FOR UPDATE SKIP LOCKED

-- name: naive_delete
DELETE FROM {schema}.message WHERE seq = %(seq)s

-- name: count_rows
SELECT count(*) FROM {schema}.{table}

-- name: load_faststream
-- faststream-outbox rows as broker.publish(body, queue=..., headers=...) writes them: the
-- envelope headers (content-type, correlation_id) plus ours; the Kafka key travels as a header
-- because the table has no key column.
INSERT INTO {schema}.{table} (queue, payload, headers)
SELECT %(queue)s, b.payload,
       b.headers || jsonb_build_object('content-type', 'application/json',
                                       'correlation_id', b.id::text,
                                       'kafka-key', convert_from(b.msg_key, 'UTF8'))
  FROM {source}.backlog AS b
 WHERE b.n <= %(limit)s
 ORDER BY b.n

-- name: server_facts
SELECT current_setting('server_version'), current_setting('shared_buffers'),
       current_setting('synchronous_commit'), current_setting('fsync')

-- name: first_message
-- A drain is over once this finds nothing: an index probe, cheap to repeat every few ms.
SELECT seq FROM {schema}.message ORDER BY seq LIMIT 1

-- name: bucket_spread
-- Buckets per relay, as the claim queries see them (a live lease, no handoff pending).
SELECT b.holder, count(*) FROM {schema}.bucket_lease b
  JOIN {schema}.relay r ON r.relay_id = b.holder
 WHERE b.successor IS NULL AND r.expires_at > now()
 GROUP BY b.holder
 ORDER BY b.holder

-- Webhook benchmarks (webhooks.py).

-- name: load_outbox_alternating
-- The backlog split over two topics, alternating (odd n to %(odd)s, even n to %(even)s);
-- with %(even)s NULL only the odd half is loaded, so a route alone gets the same messages.
INSERT INTO {schema}.message (id, topic, msg_key, payload, content_type, headers, bucket)
SELECT b.id, CASE WHEN b.n %% 2 = 1 THEN %(odd)s ELSE %(even)s END, b.msg_key, b.payload,
       'application/json', b.headers, {schema}.key_bucket(b.msg_key)
  FROM {source}.backlog AS b
 WHERE b.n %% 2 = 1 OR %(even)s::text IS NOT NULL
 ORDER BY b.n

-- name: webhook_records
-- The backlog as the webhook sink sends it: id (the webhook-id), key and body.
SELECT n, id, msg_key, payload FROM {source}.backlog ORDER BY n

-- name: deliveries_by_route
SELECT route, count(*), count(DISTINCT message_id) FROM {schema}.delivery GROUP BY route

-- name: leftovers
SELECT (SELECT count(*) FROM {schema}.message), (SELECT count(*) FROM {schema}.route_pending),
       (SELECT count(*) FROM {schema}.dead_letter)

-- name: naive_webhook_claim
SELECT seq, id, payload, content_type
  FROM {schema}.message
 ORDER BY seq
 LIMIT 1
   FOR UPDATE SKIP LOCKED

-- name: naive_webhook_record
-- The delivered message leaves the outbox and joins the delivery log, in one statement.
WITH gone AS (
    DELETE FROM {schema}.message WHERE seq = %(seq)s RETURNING *
)
INSERT INTO {schema}.delivery_batch (route, message_id, seq, topic, msg_key, payload,
                                     content_type, headers, idempotency_key, created_at,
                                     attempts, kafka_partition, kafka_offset)
SELECT %(route)s, ARRAY[g.id], ARRAY[g.seq], ARRAY[g.topic], ARRAY[g.msg_key], ARRAY[g.payload],
       ARRAY[g.content_type], ARRAY[g.headers], ARRAY[g.idempotency_key], ARRAY[g.created_at],
       ARRAY[1], ARRAY[NULL::int], ARRAY[NULL::bigint]
  FROM gone g
