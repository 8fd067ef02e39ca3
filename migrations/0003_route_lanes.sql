-- outbox-relay schema, version 3: routes that deliver on their own (webhooks).
--
-- A webhook route is served by its own lane: the first pass only queues the message for it
-- (a route_pending row, due at once) and the lane claims, sends and records those rows at its
-- own pace, so a slow or failing endpoint never holds back another route.
--
--   route_state  per-route state every relay and the operator commands see: a route
--                disabled by its endpoint (HTTP 410 Gone) or by an operator stays disabled
--                until `outbox-relay routes enable`
--   last_status  the last delivery outcome in one word ("HTTP 503", "timeout",
--                "connection refused", a Kafka error name), for `dead-letters list`

CREATE TABLE route_state (
    route           text        PRIMARY KEY,
    disabled_at     timestamptz,
    disabled_reason text,
    changed_at      timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE route_pending ADD COLUMN last_status text;
ALTER TABLE dead_letter ADD COLUMN last_status text;

-- Messages queued for a lane stay in the hot table (fanned) until every route is done; the
-- first-pass claim must not scan past them when a slow endpoint builds a backlog.
CREATE INDEX message_first_pass_idx ON message (seq) WHERE NOT fanned;

CREATE INDEX dead_letter_route_idx ON dead_letter (route, dead_at);

-- route_pending is a queue too: the first pass bulk-inserts into it, and the claim's plan
-- needs fresh statistics (lanes also ANALYZE it when a claim turns slow, see relay.lanes).
ALTER TABLE route_pending SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
