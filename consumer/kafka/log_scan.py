"""What a change topic's partition holds between two offsets, as a read_committed reader sees it
(transaction markers and aborted records are the offsets it never gets), read once in order; and
the source coordinates the dead-letter topic's headers record. Read by `cdc-consumer audit`
(consumer/ops/audit.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from consumer.kafka.client_config import KafkaClientConfig
from consumer.kafka.source import Partition

log = logging.getLogger(__name__)


class KafkaLog:
    """Reads ranges of partitions with a group id of its own that never joins or commits."""

    def __init__(self, kafka: KafkaClientConfig, group: str, timeout: float = 30.0):
        self.timeout = timeout
        self.reader = Consumer(
            kafka.client(
                {
                    "group.id": f"{group}-audit",  # never joined, never committed
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": 50,  # a range ends at its last record or the log's end: no waiting
                }
            )
        )

    def close(self) -> None:
        self.reader.close()

    def messages(self, partition: Partition, start: int, stop: int) -> Iterator[Any]:
        """The records of [start, stop), in order."""
        if start >= stop:
            return
        self.reader.assign([TopicPartition(*partition, start)])
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                batch = self.reader.consume(10_000, 0.5)
                if not batch and time.monotonic() > deadline:
                    raise TimeoutError(f"{partition}: Kafka gave nothing past offset {start} for {self.timeout}s")
                for message in batch:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            return
                        raise RuntimeError(f"{partition}: {error}")
                    if message.offset() >= stop:
                        return
                    yield message
                    # Set once the caller resumes: it may have spent a while between records.
                    deadline = time.monotonic() + self.timeout
                    if message.offset() == stop - 1:
                        return
        finally:
            self.reader.unassign()

    def cursor(self, partition: Partition, start: int, stop: int) -> LogCursor:
        return LogCursor(self.messages(partition, start, stop))

    def dead_lettered(self, dlq_topic: str) -> dict[Partition, set[int]]:
        """Source coordinates of every record of the dead-letter topic, from its headers."""
        metadata = self.reader.list_topics(dlq_topic, timeout=self.timeout).topics.get(dlq_topic)
        found: dict[Partition, set[int]] = {}
        if metadata is None or metadata.error is not None:
            return found
        for p in metadata.partitions:
            low, high = self.reader.get_watermark_offsets(TopicPartition(dlq_topic, p), timeout=self.timeout)
            for message in self.messages((dlq_topic, p), low, high):
                headers = dict(message.headers() or [])
                try:
                    source = (headers["cdc.source.topic"].decode(), int(headers["cdc.source.partition"]))
                    offset = int(headers["cdc.source.offset"])
                except (KeyError, ValueError, UnicodeDecodeError):
                    log.warning("audit: %s[%d]@%d has no source coordinates", dlq_topic, p, message.offset())
                    continue
                found.setdefault(source, set()).add(offset)
        return found


class LogCursor:
    """The records of one range of a partition, read once and taken in consecutive windows, so
    a long range is checked window by window in one pass over Kafka."""

    def __init__(self, records: Iterator[Any]):
        self._records = records
        self._ahead: Any = None

    def below(self, offset: int) -> Iterator[Any]:
        """The next records whose offset is below `offset`."""
        while True:
            if self._ahead is None:
                self._ahead = next(self._records, None)
                if self._ahead is None:
                    return
            if self._ahead.offset() >= offset:
                return
            record, self._ahead = self._ahead, None
            yield record

    def close(self) -> None:
        self._records.close()
