-- outbox-relay schema, version 2: many relays on one database.
--
-- Every message carries a bucket (0-255) computed from its key at publish time. Each bucket
-- is held by at most one relay; only the holder claims keyed messages of that bucket, so
-- two relays never deliver the same key at once. Keyless messages carry no order promise
-- and any relay may claim them.
--
--   relay         live relays: each row is its relay's lease, renewed by its heartbeat; all
--                 the buckets a relay holds are valid exactly while its row has not expired
--                 (one row written per heartbeat, however many buckets)
--   bucket_lease  one row per bucket: its holder, and the successor a draining handoff is
--                 waiting for

CREATE TABLE relay (
    relay_id     text        PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

CREATE TABLE bucket_lease (
    bucket     smallint    PRIMARY KEY,
    -- The relay that alone may claim keyed messages of this bucket, while its relay row
    -- has not expired.
    holder     text,
    -- Set when the bucket should move to another relay. The holder stops claiming it, ends
    -- its in-flight batch and only then writes successor into holder (a draining handoff).
    successor  text,
    -- Increases on every change of holder: a fencing token, and a count of moves.
    epoch      bigint      NOT NULL DEFAULT 0,
    changed_at timestamptz,
    CONSTRAINT bucket_lease_bucket_valid CHECK (bucket BETWEEN 0 AND 255)
);

INSERT INTO bucket_lease (bucket) SELECT b FROM generate_series(0, 255) AS b;

-- Retries and parked messages are claimed by the bucket's holder too.
ALTER TABLE route_pending ADD COLUMN bucket smallint;
UPDATE route_pending p SET bucket = m.bucket FROM message m WHERE m.seq = p.seq;
UPDATE route_pending SET bucket = 0 WHERE bucket IS NULL;
ALTER TABLE route_pending ALTER COLUMN bucket SET NOT NULL;
