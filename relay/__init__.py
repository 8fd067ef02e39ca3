"""outbox-relay: the service that delivers committed outbox messages.

Run it with ``outbox-relay run``; see ``outbox-relay --help``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("outbox-relay")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
