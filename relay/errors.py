"""Errors raised by the relay service.

::

    outbox_lib.OutboxError
    └── RelayError
        ├── ConfigError (also outbox_lib.ConfigurationError)   a flag, variable or file is invalid
        ├── SinkError                                          a sink could not be set up
        ├── NotFoundError                                      an operator command named nothing
        ├── UsageError                                         a command line that cannot run
        └── EmbeddedServiceError                               the demo's embedded services failed

The CLI prints any ``OutboxError`` as one line (exit 2 for bad input, 1 for runtime failure).
"""

from __future__ import annotations

from outbox_lib import ConfigurationError, OutboxError


def one_line(exc: BaseException) -> str:
    """The first line of an error's text (or its type's name): for logs and CLI errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RelayError(OutboxError):
    """Base class of the relay's own errors."""


class SchemaTooNewError(RelayError):
    """The schema serves a first-pass format this relay does not speak: upgrade the relay."""


class ConfigError(RelayError, ConfigurationError):
    """Invalid configuration; the message names its source (flag, variable or file key)."""


class SinkError(RelayError):
    """A sink could not be created from its settings."""


class NotFoundError(RelayError):
    """An operator command named something that does not exist (e.g. a dead letter's id)."""


class UsageError(RelayError):
    """A command line that cannot run as given, found after parsing (e.g. ``discard``
    without a terminal to confirm on and without ``--yes``): exit 2, like a wrong flag."""


class EmbeddedServiceError(RelayError):
    """An embedded demo/test service (PostgreSQL, broker) is not installed or did not start."""
