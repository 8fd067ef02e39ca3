"""Port helpers for tests; the implementations are the embedded services' own."""

from __future__ import annotations

import time

from relay.embedded import free_port, port_accepts

__all__ = ["free_port", "port_accepts", "wait_for_port"]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until ``host:port`` accepts TCP or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not port_accepts(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections in {timeout}s")
        time.sleep(0.01)
