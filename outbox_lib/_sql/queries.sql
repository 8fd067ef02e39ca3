-- SQL that outbox_lib runs inside the application's own transaction.
-- {schema} is replaced by the quoted schema identifier.

-- name: enqueue
SELECT {schema}.enqueue(
    :topic, :payload, :content_type, :msg_key, CAST(:headers AS jsonb), :idempotency_key
)

-- name: inbox_accept
SELECT {schema}.inbox_accept(:consumer, :idempotency_key, :topic)
