"""Sinks: where the relay sends messages. See :mod:`relay.sinks.base` for the interface."""

from .base import Delivered, Failed, FailureKind, KeyGate, Outbound, Result, Sink

__all__ = ["Delivered", "Failed", "FailureKind", "KeyGate", "Outbound", "Result", "Sink"]
