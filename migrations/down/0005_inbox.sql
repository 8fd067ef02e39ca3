-- Reverses 0005_inbox.sql. Drops the inbox and every key it holds: after an upgrade back,
-- consumers process again whatever is redelivered to them.

DROP FUNCTION inbox_accept(text, text);
DROP TABLE inbox;
