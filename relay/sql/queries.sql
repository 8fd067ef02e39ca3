-- Every statement the relay runs. {schema} is replaced by the quoted schema identifier;
-- values are always bound parameters.

-- name: first_pass_position
-- The first pass's cursor: its newest position row (a backward scan of the primary key
-- reaches it first, however many older rows wait for vacuum).
SELECT position_id, start_tick, end_tick, after_seq
  FROM {schema}.first_pass
 ORDER BY position_id DESC
 LIMIT 1

-- name: move_first_pass
-- Move the cursor from position %(prev)s, only if nobody moved it since (the unique prev_id:
-- a second mover finds the conflict, after waiting for the first to commit) and only if
-- this relay still holds bucket 0 with a live lease (the first pass is read by that relay).
-- No row comes back when either fails: the caller rolls back and records nothing.
INSERT INTO {schema}.first_pass (prev_id, start_tick, end_tick, after_seq, relay_id)
SELECT %(prev)s, %(start)s, %(end)s, %(after)s, %(relay)s
 WHERE EXISTS (SELECT 1 FROM {schema}.bucket_lease b JOIN {schema}.relay r ON r.relay_id = b.holder
                WHERE b.bucket = 0 AND b.holder = %(relay)s AND r.expires_at > now())
ON CONFLICT (prev_id) DO NOTHING
RETURNING position_id

-- name: forget_first_pass_rows
-- After a move: the position it replaced and, when a batch is done, the tick it started
-- from. Exact rows, never a range, so dead rows kept by a long transaction are never walked.
WITH p AS (
    DELETE FROM {schema}.first_pass WHERE position_id = %(prev)s
), t AS (
    DELETE FROM {schema}.tick WHERE tick_id = %(tick)s::bigint
)
SELECT 1

-- name: any_route_pending
SELECT EXISTS (SELECT 1 FROM {schema}.route_pending)

-- name: blocked_keys
-- (route, topic, key) combinations that still have earlier work pending: messages of these
-- keys must queue behind it on that route.
SELECT DISTINCT p.route, p.topic, p.msg_key
  FROM {schema}.route_pending p
  JOIN unnest(%(topics)s::text[], %(keys)s::bytea[]) AS k(topic, msg_key)
    ON p.topic = k.topic AND p.msg_key = k.msg_key

-- name: claim_retry_pass
-- Due route_pending rows of the given routes, oldest first; keyed rows only of buckets this
-- relay holds. A keyed row waits while an earlier row of the same route and key is not due
-- yet or is leased. A lease counts only while its relay is alive: the rows a killed relay
-- had in flight come back once its relay row expires (the bucket lease time), not after
-- the much longer claim lease.
WITH candidate AS (
    SELECT p.seq, p.route
      FROM {schema}.route_pending p
     WHERE p.available_at <= now()
       AND (p.claimed_until IS NULL OR p.claimed_until < now()
            OR NOT EXISTS (SELECT 1 FROM {schema}.relay l
                            WHERE l.relay_id = p.claimed_by AND l.expires_at > now()))
       AND p.route = ANY(%(routes)s::text[])
       AND (p.msg_key IS NULL OR p.bucket = ANY(ARRAY(
            SELECT b.bucket FROM {schema}.bucket_lease b JOIN {schema}.relay r ON r.relay_id = b.holder
             WHERE b.holder = %(relay)s AND b.successor IS NULL AND r.expires_at > now())))
       AND (p.msg_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM {schema}.route_pending e
             WHERE e.route = p.route AND e.topic = p.topic AND e.msg_key = p.msg_key
               AND e.seq < p.seq
               AND (e.available_at > now()
                    OR (e.claimed_until >= now()
                        AND EXISTS (SELECT 1 FROM {schema}.relay l
                                     WHERE l.relay_id = e.claimed_by AND l.expires_at > now())))))
     ORDER BY p.seq
     LIMIT %(limit)s
       FOR UPDATE OF p SKIP LOCKED
)
UPDATE {schema}.route_pending p
   SET claimed_by = %(relay)s,
       claimed_until = now() + %(lease)s
  FROM candidate c, {schema}.message m
 WHERE p.seq = c.seq AND p.route = c.route AND m.seq = p.seq
RETURNING m.seq, m.id, m.topic, m.msg_key, m.payload, m.content_type, m.headers,
          m.idempotency_key, m.created_at, p.attempts, p.route

-- name: finish_first_pass
-- One statement for the common case: the messages are done on every route. They leave the
-- hot table; what each route delivered is written from what was deleted as one batch row
-- per route (d_routes: the routes, each once), and the dead letters one row each. The arrays
-- of one aggregate call are filled from the same rows in the same order, so their i-th
-- elements are one message. One plain aggregate per route, over a hash join of the chunk:
-- no sort, whatever the planner knows of the table.
WITH gone AS (
    DELETE FROM {schema}.message m
     WHERE m.seq = ANY(%(finished)s::bigint[])
    RETURNING m.*
), delivered AS (
    INSERT INTO {schema}.delivery_batch (route, message_id, seq, topic, msg_key, payload,
                                         content_type, headers, idempotency_key, created_at,
                                         attempts, kafka_partition, kafka_offset)
    SELECT r.route, a.*
      FROM unnest(%(d_routes)s::text[]) AS r(route)
     CROSS JOIN LATERAL (
        SELECT array_agg(g.id), array_agg(g.seq), array_agg(g.topic), array_agg(g.msg_key),
               array_agg(g.payload), array_agg(g.content_type), array_agg(g.headers),
               array_agg(g.idempotency_key), array_agg(g.created_at), array_agg(d.attempts),
               array_agg(d.part), array_agg(d.off)
          FROM gone g
          JOIN unnest(%(d_seq)s::bigint[], %(d_route)s::text[], %(d_attempts)s::int[],
                      %(d_partition)s::int[], %(d_offset)s::bigint[])
               AS d(seq, route, attempts, part, off) ON d.seq = g.seq
         WHERE d.route = r.route) AS a
    RETURNING cardinality(message_id) AS n
), dead AS (
    INSERT INTO {schema}.dead_letter (message_id, seq, route, topic, msg_key, payload,
                                      content_type, headers, idempotency_key, bucket,
                                      created_at, attempts, reason, last_error, last_status)
    SELECT g.id, g.seq, x.route, g.topic, g.msg_key, g.payload, g.content_type, g.headers,
           g.idempotency_key, g.bucket, g.created_at, x.attempts, x.reason, x.error, x.status
      FROM gone g
      JOIN unnest(%(x_seq)s::bigint[], %(x_route)s::text[], %(x_attempts)s::int[],
                  %(x_reason)s::text[], %(x_error)s::text[], %(x_status)s::text[])
           AS x(seq, route, attempts, reason, error, status) ON x.seq = g.seq
    ON CONFLICT (message_id, route) DO UPDATE
       SET attempts = EXCLUDED.attempts, reason = EXCLUDED.reason,
           last_error = EXCLUDED.last_error, last_status = EXCLUDED.last_status,
           dead_at = EXCLUDED.dead_at, discarded_at = NULL, discarded_reason = NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT coalesce(sum(n), 0) FROM delivered),
       (SELECT count(*) FROM dead)

-- name: insert_deliveries
-- What the retry pass delivered: one batch row per route (as in finish_first_pass).
INSERT INTO {schema}.delivery_batch (route, message_id, seq, topic, msg_key, payload,
                                     content_type, headers, idempotency_key, created_at,
                                     attempts, kafka_partition, kafka_offset)
SELECT d.route, array_agg(m.id), array_agg(m.seq), array_agg(m.topic), array_agg(m.msg_key),
       array_agg(m.payload), array_agg(m.content_type), array_agg(m.headers),
       array_agg(m.idempotency_key), array_agg(m.created_at), array_agg(d.attempts),
       array_agg(d.part), array_agg(d.off)
  FROM unnest(%(seq)s::bigint[], %(route)s::text[], %(attempts)s::int[],
              %(partition)s::int[], %(offset)s::bigint[]) AS d(seq, route, attempts, part, off)
  JOIN {schema}.message m ON m.seq = d.seq
 GROUP BY d.route

-- name: insert_dead_letters
INSERT INTO {schema}.dead_letter (message_id, seq, route, topic, msg_key, payload, content_type,
                                  headers, idempotency_key, bucket, created_at, attempts,
                                  reason, last_error, last_status)
SELECT m.id, m.seq, x.route, m.topic, m.msg_key, m.payload, m.content_type, m.headers,
       m.idempotency_key, m.bucket, m.created_at, x.attempts, x.reason, x.error, x.status
  FROM unnest(%(seq)s::bigint[], %(route)s::text[], %(attempts)s::int[], %(reason)s::text[],
              %(error)s::text[], %(status)s::text[]) AS x(seq, route, attempts, reason, error, status)
  JOIN {schema}.message m ON m.seq = x.seq
ON CONFLICT (message_id, route) DO UPDATE
   SET attempts = EXCLUDED.attempts, reason = EXCLUDED.reason,
       last_error = EXCLUDED.last_error, last_status = EXCLUDED.last_status,
       dead_at = EXCLUDED.dead_at, discarded_at = NULL, discarded_reason = NULL

-- name: upsert_pending
INSERT INTO {schema}.route_pending AS p (seq, route, topic, msg_key, bucket, attempts,
                                         available_at, last_error, last_status)
SELECT u.seq, u.route, u.topic, u.msg_key, m.bucket, u.attempts, now() + u.delay, u.error,
       u.status
  FROM unnest(%(seq)s::bigint[], %(route)s::text[], %(topic)s::text[], %(key)s::bytea[],
              %(attempts)s::int[], %(delay)s::interval[], %(error)s::text[], %(status)s::text[])
       AS u(seq, route, topic, msg_key, attempts, delay, error, status)
  JOIN {schema}.message m ON m.seq = u.seq
ON CONFLICT (seq, route) DO UPDATE
   SET attempts = EXCLUDED.attempts, available_at = EXCLUDED.available_at,
       last_error = coalesce(EXCLUDED.last_error, p.last_error),
       last_status = coalesce(EXCLUDED.last_status, p.last_status),
       claimed_by = NULL, claimed_until = NULL

-- name: delete_pending
DELETE FROM {schema}.route_pending p
 USING unnest(%(seq)s::bigint[], %(route)s::text[]) AS d(seq, route)
 WHERE p.seq = d.seq AND p.route = d.route

-- name: settle_fanned
-- Messages the first pass left with pending routes: they stay until those finish.
UPDATE {schema}.message
   SET fanned = true
 WHERE seq = ANY(%(seqs)s::bigint[])

-- name: analyze_pending
-- Statistics for the claim's plan: the first pass can queue thousands of rows for a lane
-- long before autovacuum analyzes them, and an unanalyzed table makes each claim scan and
-- sort the whole backlog (250 ms a claim at 20,000 rows, 2 ms after ANALYZE).
ANALYZE {schema}.route_pending

-- name: lock_messages
-- Before finishing routes of fanned messages: one record transaction at a time per message.
SELECT 1 FROM {schema}.message
 WHERE seq = ANY(%(seqs)s::bigint[])
 ORDER BY seq
   FOR UPDATE

-- name: delete_completed
-- Fanned messages whose last pending route just finished.
DELETE FROM {schema}.message m
 WHERE m.seq = ANY(%(seqs)s::bigint[]) AND m.fanned
   AND NOT EXISTS (SELECT 1 FROM {schema}.route_pending p WHERE p.seq = m.seq)

-- name: release_all_of_relay
-- On shutdown: hand back the retries this relay still holds.
WITH b AS (
    UPDATE {schema}.route_pending SET claimed_by = NULL, claimed_until = NULL
     WHERE claimed_by = %(relay)s RETURNING 1
)
SELECT count(*) FROM b

-- name: next_due
SELECT extract(epoch FROM min(available_at) - now()) FROM {schema}.route_pending
 WHERE route = ANY(%(routes)s::text[])

-- name: schema_version
SELECT max(version) FROM {schema}.schema_migrations

-- name: relay_format
-- The first-pass format the schema serves (from schema version 7; before it, format 1).
SELECT {schema}.relay_format()

-- name: status_relays
SELECT r.relay_id, r.host, r.pid, r.started_at, r.heartbeat_at,
       extract(epoch FROM now() - r.heartbeat_at),
       coalesce(array_agg(b.bucket ORDER BY b.bucket) FILTER (WHERE b.bucket IS NOT NULL),
                '{{}}'::smallint[]),
       coalesce(array_agg(b.bucket ORDER BY b.bucket)
                FILTER (WHERE b.bucket IS NOT NULL AND b.successor IS NOT NULL),
                '{{}}'::smallint[])
  FROM {schema}.relay r
  LEFT JOIN {schema}.bucket_lease b ON b.holder = r.relay_id
 WHERE r.expires_at > now()
 GROUP BY r.relay_id
 ORDER BY r.relay_id

-- Bucket ownership. Membership changes run one at a time under a transaction-scoped
-- advisory lock; each is a handful of statements over at most 256 rows.

-- name: membership_lock
SELECT pg_advisory_xact_lock(%(lock)s)

-- name: heartbeat
-- Renews this relay's lease, and with it every bucket it holds. A relay whose row expired
-- but was not yet removed keeps its buckets: nobody else can have delivered their keys.
INSERT INTO {schema}.relay (relay_id, host, pid, expires_at)
VALUES (%(relay)s, %(host)s, %(pid)s, now() + %(lease)s)
ON CONFLICT (relay_id) DO UPDATE
   SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at

-- name: forget_expired_relays
DELETE FROM {schema}.relay WHERE expires_at <= now() RETURNING relay_id

-- name: live_relays
SELECT relay_id FROM {schema}.relay ORDER BY relay_id

-- name: bucket_leases
SELECT b.bucket, b.holder, b.successor,
       b.holder IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {schema}.relay r
                                             WHERE r.relay_id = b.holder AND r.expires_at > now())
  FROM {schema}.bucket_lease b
 ORDER BY b.bucket

-- name: assign_buckets
-- Free buckets (never held, released, or their holder's lease expired) get a holder at once;
-- a holder assigned by another relay's rebalance learns it at its next heartbeat.
UPDATE {schema}.bucket_lease b
   SET holder = a.holder, successor = NULL, epoch = b.epoch + 1, changed_at = now()
  FROM unnest(%(buckets)s::smallint[], %(holders)s::text[]) AS a(bucket, holder)
 WHERE b.bucket = a.bucket

-- name: mark_successors
-- Buckets of a live holder move only through it: it is asked to hand them over.
UPDATE {schema}.bucket_lease b
   SET successor = a.successor
  FROM unnest(%(buckets)s::smallint[], %(successors)s::text[]) AS a(bucket, successor)
 WHERE b.bucket = a.bucket

-- name: hand_over
-- The draining holder has no batch in flight: the successor, if still alive, takes over
-- (otherwise the bucket is free for the next rebalance).
UPDATE {schema}.bucket_lease b
   SET holder = (SELECT r.relay_id FROM {schema}.relay r
                  WHERE r.relay_id = b.successor AND r.expires_at > now()),
       successor = NULL, epoch = b.epoch + 1, changed_at = now()
 WHERE b.holder = %(relay)s AND b.successor IS NOT NULL
RETURNING b.bucket, b.holder

-- name: own_buckets
SELECT bucket, successor IS NOT NULL FROM {schema}.bucket_lease
 WHERE holder = %(relay)s ORDER BY bucket

-- name: fence_sessions
-- Sessions of relays whose expired buckets were just reassigned (see Membership).
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
 WHERE application_name = ANY(%(names)s::text[]) AND usename = current_user
   AND pid <> pg_backend_pid()

-- name: release_buckets
UPDATE {schema}.bucket_lease
   SET holder = NULL, successor = NULL, epoch = epoch + 1, changed_at = now()
 WHERE holder = %(relay)s

-- name: leave
DELETE FROM {schema}.relay WHERE relay_id = %(relay)s

-- name: wake_relays
SELECT pg_notify(%(channel)s, '')

-- Routes disabled by their endpoint (HTTP 410) or by an operator.

-- name: disabled_routes
SELECT route, coalesce(disabled_reason, 'disabled') FROM {schema}.route_state
 WHERE disabled_at IS NOT NULL

-- name: disable_route
INSERT INTO {schema}.route_state AS s (route, disabled_at, disabled_reason, changed_at)
VALUES (%(route)s, now(), %(reason)s, now())
ON CONFLICT (route) DO UPDATE
   SET disabled_at = coalesce(s.disabled_at, EXCLUDED.disabled_at),
       disabled_reason = coalesce(s.disabled_reason, EXCLUDED.disabled_reason),
       changed_at = now()

-- Operator commands (`outbox-relay dead-letters ...`, `routes ...`, `status`). Each runs in
-- its own short transaction on the operator's connection.

-- name: status_routes
-- Every route the database knows of (a route_state row, pending work or dead letters), with
-- its state and counts; 'no-route' is the dead letters of topics that matched no route.
WITH pending AS (
    SELECT route, count(*) AS n FROM {schema}.route_pending GROUP BY route
), dead AS (
    SELECT route, count(*) AS n FROM {schema}.dead_letter WHERE discarded_at IS NULL
     GROUP BY route
), known AS (
    SELECT route FROM {schema}.route_state
    UNION SELECT route FROM pending
    UNION SELECT route FROM dead
)
SELECT k.route, s.disabled_at, s.disabled_reason, coalesce(p.n, 0), coalesce(d.n, 0)
  FROM known k
  LEFT JOIN {schema}.route_state s ON s.route = k.route
  LEFT JOIN pending p ON p.route = k.route
  LEFT JOIN dead d ON d.route = k.route
 ORDER BY k.route

-- name: ops_list_dead_letters
-- Newest first; the last column counts every match, so the caller can say what LIMIT hid.
-- Live letters, or (discarded) the discarded ones, kept for audit until purged.
SELECT message_id, route, topic, msg_key, attempts, last_status, reason, last_error,
       dead_at, created_at, idempotency_key, discarded_at, discarded_reason, count(*) OVER ()
  FROM {schema}.dead_letter d
 WHERE (CASE WHEN %(discarded)s::boolean THEN d.discarded_at IS NOT NULL
             ELSE d.discarded_at IS NULL END)
   AND (%(id)s::uuid IS NULL OR d.message_id = %(id)s::uuid)
   AND (%(topic)s::text IS NULL OR d.topic = %(topic)s::text)
   AND (%(route)s::text IS NULL OR d.route = %(route)s::text)
   AND (%(since)s::timestamptz IS NULL OR d.dead_at >= %(since)s::timestamptz)
 ORDER BY d.dead_at DESC, d.message_id, d.route
 LIMIT %(limit)s

-- name: ops_count_dead_letters
-- What a retry or discard of the same selection would take: live letters per route, how many
-- messages they are (one message may be dead on several routes), the newest one's dead_at and
-- a checksum of which letters they are (a sum of one hash per letter, as
-- ops_discard_dead_letters computes it). A discard confirmed after the count passes the
-- last two back: it takes exactly the letters counted, or none.
WITH matching AS (
    SELECT d.message_id, d.route, d.dead_at
      FROM {schema}.dead_letter d
     WHERE d.discarded_at IS NULL
       AND (%(id)s::uuid IS NULL OR d.message_id = %(id)s::uuid)
       AND (%(topic)s::text IS NULL OR d.topic = %(topic)s::text)
       AND (%(route)s::text IS NULL OR d.route = %(route)s::text)
       AND (%(since)s::timestamptz IS NULL OR d.dead_at >= %(since)s::timestamptz)
)
SELECT m.route, count(*), (SELECT count(DISTINCT message_id) FROM matching),
       (SELECT max(dead_at) FROM matching),
       (SELECT sum(hashtextextended(message_id::text || ' ' || route, 0)) FROM matching)
  FROM matching m
 GROUP BY m.route
 ORDER BY m.route

-- name: ops_retry_dead_letters
-- Revive the selected live dead letters in one statement. DELETE ... RETURNING takes each row
-- at most once, so two operators retrying at the same time never revive a letter twice (the
-- second waits for the first's row locks, then finds the rows gone).
-- Each message comes back once, as a new row (new seq, same id, idempotency key and bucket),
-- in its original order, so retried messages of one key keep their relative order:
-- * a 'no-route' letter comes back unfanned: its first pass routes it with the routes the
--   relays have now (should the same message also have letters of real routes, which takes
--   a configuration change between the two, the first pass covers those routes too);
-- * any other letter comes back fanned with a route_pending row, due now with its attempts
--   reset, for the route that dead-lettered it and no other.
WITH picked AS (
    DELETE FROM {schema}.dead_letter d
     WHERE d.discarded_at IS NULL
       AND (%(id)s::uuid IS NULL OR d.message_id = %(id)s::uuid)
       AND (%(topic)s::text IS NULL OR d.topic = %(topic)s::text)
       AND (%(route)s::text IS NULL OR d.route = %(route)s::text)
       AND (%(since)s::timestamptz IS NULL OR d.dead_at >= %(since)s::timestamptz)
    RETURNING d.*
), revived AS (
    INSERT INTO {schema}.message (id, topic, msg_key, payload, content_type, headers,
                                  idempotency_key, bucket, created_at, fanned)
    SELECT u.message_id, u.topic, u.msg_key, u.payload, u.content_type, u.headers,
           u.idempotency_key, u.bucket, u.created_at, u.fanned
      FROM (SELECT DISTINCT ON (p.message_id) p.*,
                   NOT bool_or(p.route = 'no-route') OVER (PARTITION BY p.message_id) AS fanned
              FROM picked p
             ORDER BY p.message_id, p.seq) u
     ORDER BY u.seq, u.message_id
    RETURNING seq, id, fanned
), queued AS (
    INSERT INTO {schema}.route_pending (seq, route, topic, msg_key, bucket, attempts,
                                        available_at)
    SELECT r.seq, p.route, p.topic, p.msg_key, p.bucket, 0, now()
      FROM picked p
      JOIN revived r ON r.id = p.message_id
     WHERE r.fanned
    RETURNING 1
)
SELECT p.route, count(*), (SELECT count(*) FROM revived), (SELECT count(*) FROM queued)
  FROM picked p
 GROUP BY p.route
 ORDER BY p.route

-- name: ops_discard_dead_letters
-- Discard the selected live letters: kept (for audit, until `purge`), out of every count,
-- list and retry. After a count (`upto` and `checksum` from ops_count_dead_letters), only
-- letters dead-lettered up to the newest one counted, and only if they are still exactly the
-- letters counted: a letter stamped before the count but committed after it, or retried
-- meanwhile, changes the checksum, and then nothing is discarded. Each row: how many letters
-- match now and their checksum, then a route and how many of its letters were discarded
-- (one row with a NULL route when none were). Two operators discarding at once: the second
-- waits for the first's row locks, then finds the rows no longer live.
WITH matching AS MATERIALIZED (
    SELECT d.message_id, d.route
      FROM {schema}.dead_letter d
     WHERE d.discarded_at IS NULL
       AND (%(id)s::uuid IS NULL OR d.message_id = %(id)s::uuid)
       AND (%(topic)s::text IS NULL OR d.topic = %(topic)s::text)
       AND (%(route)s::text IS NULL OR d.route = %(route)s::text)
       AND (%(since)s::timestamptz IS NULL OR d.dead_at >= %(since)s::timestamptz)
       AND (%(upto)s::timestamptz IS NULL OR d.dead_at <= %(upto)s::timestamptz)
), found AS (
    SELECT count(*) AS letters,
           coalesce(sum(hashtextextended(message_id::text || ' ' || route, 0)), 0) AS checksum
      FROM matching
), gone AS (
    UPDATE {schema}.dead_letter d
       SET discarded_at = now(), discarded_reason = %(reason)s::text
      FROM matching m
     WHERE d.message_id = m.message_id AND d.route = m.route
       AND d.discarded_at IS NULL
       AND (%(checksum)s::numeric IS NULL
            OR (SELECT checksum FROM found) = %(checksum)s::numeric)
    RETURNING d.route
), per_route AS (
    SELECT route, count(*) AS letters FROM gone GROUP BY route
)
SELECT f.letters, f.checksum, p.route, p.letters
  FROM found f
  LEFT JOIN per_route p ON true
 ORDER BY p.route

-- name: ops_replay_deliveries
-- Deliver again, to one route, messages that route delivered (`outbox-relay replay`). Each
-- comes back once (a message delivered twice, e.g. replayed before, counts once) as a new
-- row with its id, idempotency key and key, and the bucket of its key; already fanned, with
-- a route_pending row for that route only, due now; in the order first delivered, so one
-- key's messages keep their order. Of the first `limit` chosen, a message that already waits
-- for that route (a route_pending row of a message with its id: replayed or retried and not
-- yet delivered) is skipped, so running the same replay twice queues it once. That check is
-- a hash anti-join against the route's pending rows of the topic (route_pending_key_idx),
-- never a scan of message per row. The idempotency table is not touched. A dry run inserts
-- nothing. Returns what is (or would be) replayed, what was queued, and what was skipped.
WITH picked AS (
    SELECT DISTINCT ON (d.message_id) d.*
      FROM {schema}.delivery d
     WHERE d.topic = %(topic)s::text AND d.route = %(route)s::text
       AND (%(since)s::timestamptz IS NULL OR d.delivered_at >= %(since)s::timestamptz)
       AND (%(until)s::timestamptz IS NULL OR d.delivered_at < %(until)s::timestamptz)
       AND (%(key)s::bytea IS NULL OR d.msg_key = %(key)s::bytea)
     ORDER BY d.message_id, d.seq
), chosen AS (
    SELECT * FROM picked ORDER BY seq LIMIT %(limit)s::bigint
), fresh AS (
    SELECT c.*
      FROM chosen c
     WHERE NOT EXISTS (SELECT 1
                         FROM {schema}.route_pending p
                         JOIN {schema}.message m ON m.seq = p.seq
                        WHERE p.route = %(route)s::text AND p.topic = %(topic)s::text
                          AND m.id = c.message_id)
), revived AS (
    INSERT INTO {schema}.message (id, topic, msg_key, payload, content_type, headers,
                                  idempotency_key, bucket, created_at, fanned)
    SELECT f.message_id, f.topic, f.msg_key, f.payload, f.content_type, f.headers,
           f.idempotency_key, {schema}.key_bucket(f.msg_key), f.created_at, true
      FROM fresh f
     WHERE NOT %(dry_run)s::boolean
     ORDER BY f.seq
    RETURNING seq, topic, msg_key, bucket
), queued AS (
    INSERT INTO {schema}.route_pending (seq, route, topic, msg_key, bucket, attempts,
                                        available_at)
    SELECT r.seq, %(route)s::text, r.topic, r.msg_key, r.bucket, 0, now()
      FROM revived r
    RETURNING 1
)
SELECT (SELECT count(*) FROM fresh), (SELECT count(*) FROM queued),
       (SELECT count(*) FROM chosen) - (SELECT count(*) FROM fresh)

-- name: ops_time_ago
-- A duration given to an operator command, as a time of the database's clock.
SELECT now() - %(ago)s::interval

-- `outbox-relay purge` walks each table once, front to back, in windows of heap blocks: one
-- pass finds the span of blocks holding rows to delete; then each batch, its own short
-- transaction that gives up on a lock after a short timeout (and is tried again later, so the
-- relays never wait behind it), picks the first `limit` of them after tid `after` and before
-- tid `before` and deletes up to the last one picked. TID Range Scans read only that window,
-- so no batch re-reads blocks an earlier one emptied. Through an index (BRIN on delivered_at,
-- btree on discarded_at) every batch would, and the purge would be quadratic. Why the walk is
-- linear: relay/purge.py. TID Range Scans need PostgreSQL 14.

-- name: ops_lock_timeout
SELECT set_config('lock_timeout', %(timeout)s::text, true)

-- name: ops_purge_deliveries_span
-- Delivery records older than the cut-off: how many (`purge --dry-run` shows it), in how many
-- batch rows, and the first and last heap block holding one (a tid read as a point is
-- (block, offset)). A batch is purged whole: its records share its delivered_at. One pass,
-- with the BRIN index on delivered_at; only the message_id arrays are read.
SELECT coalesce(sum(cardinality(message_id)), 0), count(*),
       (min(ctid)::text::point)[0]::bigint, (max(ctid)::text::point)[0]::bigint
  FROM {schema}.delivery_batch
 WHERE delivered_at < %(cutoff)s::timestamptz

-- name: ops_purge_deliveries_pick
-- How many batch rows the purge batch takes in its window, and the last one's tid. ORDER BY
-- ctid makes "every row to purge up to that tid" exact, whatever order the scan returns rows in.
SELECT count(*), max(ctid)::text
  FROM (SELECT ctid FROM {schema}.delivery_batch
         WHERE ctid > %(after)s::tid AND ctid < %(before)s::tid
           AND delivered_at < %(cutoff)s::timestamptz
         ORDER BY ctid
         LIMIT %(limit)s) AS picked

-- name: ops_purge_deliveries
-- Delete them; returns the delivery records they held. delivery_batch is append-only: no row
-- moves while purge walks the table, and rows added meanwhile are newer than the cut-off.
WITH gone AS (
    DELETE FROM {schema}.delivery_batch
     WHERE ctid > %(after)s::tid AND ctid <= %(last)s::tid
       AND delivered_at < %(cutoff)s::timestamptz
    RETURNING cardinality(message_id) AS n
)
SELECT coalesce(sum(n), 0) FROM gone

-- name: ops_purge_delivery_rows_span
-- The same for the records written before schema version 10, one row each (delivery_row,
-- version 9's table, which nothing adds to any more).
SELECT count(*), count(*), (min(ctid)::text::point)[0]::bigint,
       (max(ctid)::text::point)[0]::bigint
  FROM {schema}.delivery_row
 WHERE delivered_at < %(cutoff)s::timestamptz

-- name: ops_purge_delivery_rows_pick
SELECT count(*), max(ctid)::text
  FROM (SELECT ctid FROM {schema}.delivery_row
         WHERE ctid > %(after)s::tid AND ctid < %(before)s::tid
           AND delivered_at < %(cutoff)s::timestamptz
         ORDER BY ctid
         LIMIT %(limit)s) AS picked

-- name: ops_purge_delivery_rows
WITH gone AS (
    DELETE FROM {schema}.delivery_row
     WHERE ctid > %(after)s::tid AND ctid <= %(last)s::tid
       AND delivered_at < %(cutoff)s::timestamptz
    RETURNING 1
)
SELECT count(*) FROM gone

-- name: ops_purge_discarded_span
-- Dead letters discarded before the cut-off (live letters are never purged): how many, the
-- first and last heap block holding one. One pass, with dead_letter_discarded_idx.
SELECT count(*), count(*), (min(ctid)::text::point)[0]::bigint,
       (max(ctid)::text::point)[0]::bigint
  FROM {schema}.dead_letter
 WHERE discarded_at < %(cutoff)s::timestamptz

-- name: ops_purge_discarded_pick
SELECT count(*), max(ctid)::text
  FROM (SELECT ctid FROM {schema}.dead_letter
         WHERE ctid > %(after)s::tid AND ctid < %(before)s::tid
           AND discarded_at < %(cutoff)s::timestamptz
         ORDER BY ctid
         LIMIT %(limit)s) AS picked

-- name: ops_purge_discarded
-- A discarded letter is rewritten only when its message is dead-lettered again, as a live
-- letter: the check of discarded_at, made again on a row's latest version, leaves it alone.
WITH gone AS (
    DELETE FROM {schema}.dead_letter
     WHERE ctid > %(after)s::tid AND ctid <= %(last)s::tid
       AND discarded_at < %(cutoff)s::timestamptz
    RETURNING 1
)
SELECT count(*) FROM gone

-- name: ops_purge_inbox_span
-- Inbox rows accepted before the inbox cut-off (`purge --inbox-older-than`): how many, the
-- first and last heap block holding one. One pass, with inbox_accepted_idx.
SELECT count(*), count(*), (min(ctid)::text::point)[0]::bigint,
       (max(ctid)::text::point)[0]::bigint
  FROM {schema}.inbox
 WHERE accepted_at < %(cutoff)s::timestamptz

-- name: ops_purge_inbox_pick
SELECT count(*), max(ctid)::text
  FROM (SELECT ctid FROM {schema}.inbox
         WHERE ctid > %(after)s::tid AND ctid < %(before)s::tid
           AND accepted_at < %(cutoff)s::timestamptz
         ORDER BY ctid
         LIMIT %(limit)s) AS picked

-- name: ops_purge_inbox
-- inbox rows are never updated (a second accept does nothing): none moves during the walk.
WITH gone AS (
    DELETE FROM {schema}.inbox
     WHERE ctid > %(after)s::tid AND ctid <= %(last)s::tid
       AND accepted_at < %(cutoff)s::timestamptz
    RETURNING 1
)
SELECT count(*) FROM gone

-- name: ops_disabled_routes_among
SELECT route, disabled_reason FROM {schema}.route_state
 WHERE route = ANY(%(routes)s::text[]) AND disabled_at IS NOT NULL
 ORDER BY route

-- name: ops_enable_route
UPDATE {schema}.route_state
   SET disabled_at = NULL, disabled_reason = NULL, changed_at = now()
 WHERE route = %(route)s AND disabled_at IS NOT NULL
RETURNING route

-- name: ops_disable_route
INSERT INTO {schema}.route_state (route, disabled_at, disabled_reason, changed_at)
VALUES (%(route)s, now(), %(reason)s, now())
ON CONFLICT (route) DO UPDATE
   SET disabled_at = now(), disabled_reason = EXCLUDED.disabled_reason, changed_at = now()

-- name: ops_wake_relays
-- Wake the relays (the NOTIFY goes out at commit) so they see the change without waiting
-- for their next poll.
SELECT {schema}.notify_once()

-- Metrics: relay.health refreshes these gauges every few seconds (never per scrape);
-- `outbox-relay status` reads the same queries, so both always say the same.

-- name: gauge_timeout
-- A huge backlog makes the count slow; the gauges wait for the next refresh rather than
-- hold a pooled connection (readiness asks the database separately).
SET LOCAL statement_timeout = '5s'

-- name: gauge_topics
-- Per topic: pending messages and the age of the oldest (the delivery lag; a retried or
-- replayed message keeps its creation time). A skip scan over message_topic_idx finds the
-- topics, one index probe each; then each topic's count and its oldest row are one range of
-- that index. Cost grows with the topics and the backlog, never with the delivery log.
WITH RECURSIVE topics AS (
    (SELECT topic FROM {schema}.message ORDER BY topic LIMIT 1)
    UNION ALL
    SELECT (SELECT m.topic FROM {schema}.message m
             WHERE m.topic > t.topic ORDER BY m.topic LIMIT 1)
      FROM topics t
     WHERE t.topic IS NOT NULL
)
SELECT t.topic,
       (SELECT count(*) FROM {schema}.message m WHERE m.topic = t.topic),
       (SELECT extract(epoch FROM now() - m.created_at)::float8 FROM {schema}.message m
         WHERE m.topic = t.topic ORDER BY m.created_at LIMIT 1)
  FROM topics t
 WHERE t.topic IS NOT NULL

-- name: gauge_dead_letters
-- Live (not discarded) dead letters per topic and route: an index-only scan of
-- dead_letter_live_idx.
SELECT topic, route, count(*) FROM {schema}.dead_letter
 WHERE discarded_at IS NULL
 GROUP BY topic, route

-- name: gauge_relays
-- Live relays, and buckets without a live holder.
SELECT (SELECT count(*) FROM {schema}.relay WHERE expires_at > now()),
       (SELECT count(*) FROM {schema}.bucket_lease b
         WHERE NOT EXISTS (SELECT 1 FROM {schema}.relay r
                            WHERE r.relay_id = b.holder AND r.expires_at > now()))
