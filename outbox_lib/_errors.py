"""Errors raised by :mod:`outbox_lib`.

Every error derives from :class:`OutboxError`, so ``except outbox_lib.OutboxError`` catches
everything this package raises on purpose::

    OutboxError
    ├── InvalidMessageError (also ValueError)   bad topic, payload, key, headers or idempotency key
    │   └── PayloadTooLargeError                 payload over the configured size limit
    ├── UnsupportedSessionError (also TypeError) not a SQLAlchemy session on PostgreSQL
    ├── ConfigurationError (also ValueError)     an invalid setting (schema name, URL, limit, ...)
    ├── SchemaNotMigratedError                   no outbox schema: run `outbox-relay migrate`
    ├── MigrationError                           a migration cannot be applied
    ├── DatabaseUnavailableError                 the database cannot be reached
    ├── WebhookVerificationError                 a received webhook is unsigned, forged or stale
    └── MissingDependencyError (also ImportError) an optional extra is not installed

Errors that wrap a driver error keep it as ``__cause__``.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every error raised by outbox-relay."""


class InvalidMessageError(OutboxError, ValueError):
    """The message cannot be published as given; nothing was written."""


class PayloadTooLargeError(InvalidMessageError):
    """The encoded payload is larger than the configured limit."""


class UnsupportedSessionError(OutboxError, TypeError):
    """``publish`` was given something that is not a SQLAlchemy session or connection."""


class ConfigurationError(OutboxError, ValueError):
    """A setting is invalid; the message names the setting and the accepted values."""


class SchemaNotMigratedError(OutboxError):
    """The outbox schema does not exist (or is too old) in this database."""


class MigrationError(OutboxError):
    """A migration could not be applied, or the database is ahead of this code."""


class DatabaseUnavailableError(OutboxError):
    """The database could not be reached."""


class WebhookVerificationError(OutboxError):
    """A received webhook request failed Standard Webhooks verification; do not process it.

    The message says which check failed (a missing header, a stale timestamp, no matching
    signature) and never contains the secret.
    """


class MissingDependencyError(OutboxError, ImportError):
    """A module needs an optional extra that is not installed; the message names the extra."""
