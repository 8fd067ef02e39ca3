"""A FastAPI webhook receiver: verify the Standard Webhooks signature, then ship each order once.

The relay's webhook route signs every request and sends the same ``webhook-id`` on every
attempt; a retried or replayed request whose first attempt was processed is answered 204
without shipping again. Run it with::

    ORDERS_HOOK_SECRET=whsec_... DATABASE_URL=postgresql+psycopg://... \\
        uvicorn --factory docs.examples.inbox_fastapi:app_from_env --port 8000

Status codes, as the relay reads them: 204 processed (or a duplicate: done before), 401 a
bad signature (dead-lettered at once: usually a wrong secret, fix it and retry the dead
letters), 500 if shipping failed (rolled back, retried with backoff).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox_lib.inbox import Inbox, InboxMessage, WebhookReceiver, WebhookVerificationError


class Base(DeclarativeBase):
    pass


class Shipment(Base):
    """The business effect; the inbox keeps it to one row per order."""

    __tablename__ = "shipments"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int]


def create_app(database_url: str, secret: str) -> FastAPI:
    """The receiver app; ``database_url`` is an async SQLAlchemy URL (psycopg or asyncpg)."""
    engine = create_async_engine(database_url)
    receiver = WebhookReceiver(secret)
    inbox = Inbox("shipping")

    @inbox.handler_async(async_sessionmaker(engine))
    async def ship(session: AsyncSession, message: InboxMessage) -> None:
        session.add(Shipment(order_id=message.json()["order_id"]))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/hooks/orders")
    async def orders_hook(request: Request) -> Response:
        try:
            message = receiver.verify(request.headers, await request.body())
        except WebhookVerificationError as exc:
            return PlainTextResponse(str(exc), status_code=401)
        await ship(message)
        return Response(status_code=204)

    return app


def app_from_env() -> FastAPI:
    return create_app(os.environ["DATABASE_URL"], os.environ["ORDERS_HOOK_SECRET"])
