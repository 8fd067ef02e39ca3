-- Snapshot batches (relay/ticks.py, schema version 8). {schema} is the quoted schema.

-- name: take_tick
SELECT tick_id, snap::text, lo, hi, xnext::text::bigint FROM {schema}.take_tick()

-- name: tick
SELECT tick_id, snap::text, lo, hi, xnext::text::bigint FROM {schema}.tick
 WHERE tick_id = %(tick_id)s

-- Rows already routed (fanned: revived by `dead-letters retry` or `replay` for one route,
-- or queued by an earlier first pass) are not the first pass's to read.

-- name: batch_late
-- Rows of transactions running at the start tick, up to its lo, that the end tick sees
-- committed: those its xip list names, and those at or above its xmax that began before
-- xnext (the snapshot lists only running transactions below xmax). Index probes of
-- message_xid_idx, then the rows in seq order. Rows of rolled-back transactions are invisible
-- and never come back. The bounds on seq, and the order, are written as seq + 0, which no
-- index matches: the only way in is by transaction, never a walk of the seq range below lo
-- (every delivered row is there). The order is written so too, or a plan could walk an
-- index on seq in order, through every delivered row a long transaction keeps from vacuum.
-- Never prepared (relay/ticks.py): a generic plan, chosen without the values, cannot know
-- how few transactions it looks for, and walked the table (25 ms a read after a 200,000
-- drain under a pinned xmin; 0.5 ms planned with the values). `fanned IS NOT TRUE` (the
-- column is NOT NULL: the same rows as NOT fanned) does not imply the predicate of the
-- partial index message_first_pass_idx, so no plan can walk that whole index: on statistics
-- that say the table is empty (autovacuum's, after a drain whose dead rows a pinned xmin
-- keeps) the planner did, through every dead entry, 43-105 ms a read.
-- The relay skips this read when no transaction was running at the start tick.
SELECT m.seq, m.id, m.topic, m.msg_key, m.payload, m.content_type, m.headers,
       m.idempotency_key, m.created_at
  FROM {schema}.message m
 WHERE (m.xid = ANY(ARRAY(SELECT pg_snapshot_xip(%(start_snap)s::pg_snapshot)))
        OR (m.xid >= pg_snapshot_xmax(%(start_snap)s::pg_snapshot)
            AND m.xid < %(start_next)s::text::xid8))
   AND m.seq + 0 > %(after)s AND m.seq + 0 <= %(start_lo)s AND m.fanned IS NOT TRUE
   AND pg_visible_in_snapshot(m.xid, %(end_snap)s::pg_snapshot)
 ORDER BY m.seq + 0
 LIMIT %(limit)s

-- name: batch_rest
-- Rows after the start tick's lo, up to the end tick's hi, of transactions the end tick sees
-- committed and the start tick did not, in seq order, one window of seq at a time: whatever
-- plan the planner picks (an index scan, or a bitmap scan and a sort when it knows nothing
-- of the table), it touches at most the window, never the backlog beyond it. Rows of
-- transactions still running are passed over (they come in a later batch, as late rows).
SELECT m.seq, m.id, m.topic, m.msg_key, m.payload, m.content_type, m.headers,
       m.idempotency_key, m.created_at
  FROM {schema}.message m
 WHERE m.seq > %(after)s AND m.seq <= %(upto)s AND NOT m.fanned
   AND pg_visible_in_snapshot(coalesce(m.xid, '1'::xid8), %(end_snap)s::pg_snapshot)
   AND NOT pg_visible_in_snapshot(coalesce(m.xid, '1'::xid8), %(start_snap)s::pg_snapshot)
 ORDER BY m.seq
 LIMIT %(limit)s
