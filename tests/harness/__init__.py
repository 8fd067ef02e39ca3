"""Shared test harness: disposable PostgreSQL servers/databases and Kafka-compatible brokers.

Lives in its own package (rather than in conftest.py) so helpers can be imported
explicitly by tests and by the fixtures in ``tests/conftest.py``.
"""
