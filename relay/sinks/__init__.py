"""Sinks: where the relay sends messages. See :mod:`relay.sinks.base` for the interface."""

from .base import Delivered, Failed, FailureKind, Outbound, Result, Sink

__all__ = ["Delivered", "Failed", "FailureKind", "Outbound", "Result", "Sink"]
