"""Kafka helpers of the benchmark: end offsets, a group's progress, reading topics once."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

Partition = tuple[str, int]


def _probe(bootstrap: str, group_id: str | None = None) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id or f"bench-probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )


def partitions_of(bootstrap: str, topics: list[str]) -> list[Partition]:
    probe = _probe(bootstrap)
    try:
        metadata = probe.list_topics(timeout=30)
        return [(t, p) for t in topics if t in metadata.topics for p in sorted(metadata.topics[t].partitions)]
    finally:
        probe.close()


def end_offsets(bootstrap: str, topics: list[str]) -> dict[Partition, int]:
    probe = _probe(bootstrap)
    try:
        metadata = probe.list_topics(timeout=30)
        out = {}
        for t in topics:
            for p in metadata.topics[t].partitions:
                out[(t, p)] = probe.get_watermark_offsets(TopicPartition(t, p), timeout=30)[1]
        return out
    finally:
        probe.close()


class GroupProgress:
    """The committed offsets of a consumer group, read without joining it."""

    def __init__(self, bootstrap: str, group_id: str, partitions: list[Partition]):
        self.consumer = _probe(bootstrap, group_id)
        self.partitions = [TopicPartition(t, p) for t, p in partitions]

    def committed(self, attempts: int = 10) -> dict[Partition, int]:
        for _ in range(attempts - 1):
            try:
                return self._committed()
            except KafkaException:  # the group's coordinator moving (NOT_COORDINATOR) on a loaded broker
                time.sleep(1.0)
        return self._committed()

    def _committed(self) -> dict[Partition, int]:
        result = self.consumer.committed(self.partitions, timeout=30)
        return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in result}

    def lag(self, ends: dict[Partition, int]) -> int:
        committed = self.committed()
        return sum(max(0, end - committed.get(p, 0)) for p, end in ends.items())

    def close(self) -> None:
        self.consumer.close()


def read_all(bootstrap: str, topics: list[str], expected: int) -> list[tuple[str, int, int, bytes | None]]:
    """Every message of the topics (committed transactions only): (topic, partition, offset, value)."""
    ends = end_offsets(bootstrap, topics)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-read-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(t, p, 0) for t, p in ends])
    out: list[tuple[str, int, int, bytes | None]] = []
    done: set[Partition] = {p for p, end in ends.items() if end == 0}
    try:
        while len(done) < len(ends):
            for m in consumer.consume(10_000, timeout=1.0):
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        done.add((m.topic(), m.partition()))
                        continue
                    raise RuntimeError(f"Kafka: {error}")
                out.append((m.topic(), m.partition(), m.offset(), m.value()))
    finally:
        consumer.close()
    if len(out) < expected:
        raise RuntimeError(f"read {len(out)} messages, expected {expected}")
    return out


def last_message_ends(bootstrap: str, ends: dict[Partition, int], tail: int = 16) -> dict[Partition, int]:
    """Per partition, one past its last change (a message with a value): what ClickHouse's Kafka
    engine commits when done, as it commits "last offset it wrote + 1". That is below the end
    offset: a transactional topic ends in a commit marker, which takes an offset of its own, and
    the engine never commits past the tombstones that may follow the last change."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-tail-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    out = {p: 0 for p in ends}
    pending = {p for p, end in ends.items() if end > 0}
    consumer.assign([TopicPartition(t, p, max(0, ends[(t, p)] - tail)) for t, p in pending])
    try:
        while pending:
            for m in consumer.consume(1000, timeout=1.0):
                key = (m.topic(), m.partition())
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(key)
                        continue
                    raise RuntimeError(f"Kafka: {error}")
                if m.value() is not None:
                    out[key] = max(out[key], m.offset() + 1)
    finally:
        consumer.close()
    return out
