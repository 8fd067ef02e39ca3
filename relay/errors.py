"""Errors raised by the relay service.

::

    outbox_lib.OutboxError
    └── RelayError
        ├── ConfigError (also outbox_lib.ConfigurationError)   a flag, variable or file is invalid
        ├── SinkError                                          a sink could not be set up
        └── EmbeddedServiceError                               the demo's embedded services failed

The CLI prints any ``OutboxError`` as one line (exit 2 for bad input, 1 for runtime failure).
"""

from __future__ import annotations

from outbox_lib import ConfigurationError, OutboxError


class RelayError(OutboxError):
    """Base class of the relay's own errors."""


class ConfigError(RelayError, ConfigurationError):
    """Invalid configuration; the message names its source (flag, variable or file key)."""


class SinkError(RelayError):
    """A sink could not be created from its settings."""


class EmbeddedServiceError(RelayError):
    """An embedded demo/test service (PostgreSQL, broker) is not installed or did not start."""
