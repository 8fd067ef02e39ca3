"""The harness's model of the Java client's partitioner, checked against known murmur2 values
(the vectors librdkafka's own unit test uses), so the integration test that compares real
partitions with it can be trusted."""

from __future__ import annotations

import pytest

from tests.harness.kafka import java_partition

# key -> Kafka's murmur2 of its UTF-8 bytes, as the Java client computes it
VECTORS = {
    "kafka": 0xD067CF64,
    "giberish123456789": 0x8F552B0C,
    "1234": 0x9FC97B14,
    "234": 0xE7C009CA,
    "34": 0x873930DA,
    "4": 0x5A4B5CA1,
}


@pytest.mark.parametrize(("key", "hashed"), VECTORS.items())
def test_java_partition_matches_kafkas_murmur2(key: str, hashed: int) -> None:
    for partitions in (1, 3, 8, 1000):
        assert java_partition(key.encode(), partitions) == (hashed & 0x7FFFFFFF) % partitions
