-- Reverses 0003_route_lanes.sql. Drops which routes are disabled and the last delivery
-- status of pending and dead-lettered messages.

ALTER TABLE route_pending RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_insert_scale_factor,
    autovacuum_analyze_scale_factor
);
DROP INDEX dead_letter_route_idx;
DROP INDEX message_first_pass_idx;
ALTER TABLE dead_letter DROP COLUMN last_status;
ALTER TABLE route_pending DROP COLUMN last_status;
DROP TABLE route_state;
