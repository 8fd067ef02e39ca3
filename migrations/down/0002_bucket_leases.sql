-- Reverses 0002_bucket_leases.sql. Drops the relays' registrations and bucket leases (stop
-- every relay first: a version-1 relay does not use them) and the bucket copied into
-- route_pending (the message keeps its own).

ALTER TABLE route_pending DROP COLUMN bucket;
DROP TABLE bucket_lease;
DROP TABLE relay;
