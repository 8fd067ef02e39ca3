"""outbox_lib: publish messages atomically with your business writes.

::

    import outbox_lib

    with Session(engine) as session, session.begin():
        session.add(Order(id=7, total=Decimal("12.50")))
        outbox_lib.publish(session, "orders.created", {"order_id": 7}, key="7",
                           headers={"tenant": "acme"}, idempotency_key="order-7-created")

The message is stored in the ``outbox`` schema in the same transaction; the ``outbox-relay``
service delivers it after commit. Create the schema with ``outbox-relay migrate`` (or
:func:`migrate` from your own deployment code). The consumer side, which processes each
delivered message once, is :mod:`outbox_lib.inbox`.
"""

from ._encoding import DEFAULT_MAX_PAYLOAD_BYTES
from ._errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    InvalidMessageError,
    MigrationError,
    MissingDependencyError,
    OutboxError,
    PayloadTooLargeError,
    SchemaNotMigratedError,
    UnsupportedSessionError,
    WebhookVerificationError,
)
from ._migrate import applied_versions, available_migrations, migrate
from ._publish import Outbox, publish, publish_async

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "InvalidMessageError",
    "MigrationError",
    "MissingDependencyError",
    "Outbox",
    "OutboxError",
    "PayloadTooLargeError",
    "SchemaNotMigratedError",
    "UnsupportedSessionError",
    "WebhookVerificationError",
    "applied_versions",
    "available_migrations",
    "migrate",
    "publish",
    "publish_async",
]
