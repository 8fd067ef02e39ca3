"""The consumer side: process each outbox message once, however often it is delivered.

The relay delivers at least once, so a consumer sees some messages twice (a lost ack, a
relay crash, an operator's replay). Every delivery carries the same idempotency key. The
inbox records that key in the consumer's own database, in the transaction that makes the
business write, so the second delivery finds it and is skipped: the effect happens exactly
once. Create the ``inbox`` table with ``outbox-relay migrate`` on the consumer's database.

::

    from outbox_lib.inbox import Inbox, InboxMessage, KafkaInboxLoop

    inbox = Inbox("billing")

    @inbox.handler(sessionmaker(engine))
    def charge(session: Session, message: InboxMessage) -> None:
        session.add(Charge(order_id=message.json()["order_id"]))

    with KafkaInboxLoop({"bootstrap.servers": "kafka:9092", "group.id": "billing"},
                        charge, topics=["orders.created"]) as loop:
        loop.run(stop=stop_event)

Webhook receivers verify the signature first with :class:`WebhookReceiver`, then call the
same kind of handler.
"""

from .._errors import WebhookVerificationError
from ._inbox import AsyncHandler, Inbox, SyncHandler
from ._kafka import KafkaInboxLoop, LoopStats, consumer_config, is_transient
from ._message import InboxMessage
from ._webhook import WebhookReceiver

__all__ = [
    "AsyncHandler",
    "Inbox",
    "InboxMessage",
    "KafkaInboxLoop",
    "LoopStats",
    "SyncHandler",
    "WebhookReceiver",
    "WebhookVerificationError",
    "consumer_config",
    "is_transient",
]
