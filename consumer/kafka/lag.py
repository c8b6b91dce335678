"""Consumer lag, read from Kafka alone: per partition the group's committed offset, the high
watermark, the lag in messages and in seconds.

* **lag (messages)** = high watermark − committed offset. Debezium writes in transactions, so a
  partition's last offset is often a transaction marker; the pipeline commits its consumer
  *position*, which is past such markers, so a caught-up group has a lag of exactly 0. A group that
  never committed a partition starts at its first offset (`auto.offset.reset=earliest`): its lag is
  high watermark − log start.
* **lag (seconds)** = now − the Postgres commit time (`source.ts_ms`) of the oldest change not yet
  committed, i.e. of the first data record at the committed offset (markers and tombstones
  skipped), and 0 when caught up: since when ClickHouse misses changes of this partition. The
  record is read from Kafka and decoded; where it cannot be, its Kafka timestamp stands in.
  (Not "now − the last committed change": on a partition with one change an hour, a consumer
  stopped for a second would show an hour of lag. On a busy partition the two are the same.)

Everything comes from the brokers, so the numbers are right whether or not a consumer runs, for
partitions without traffic (caught up: 0 and 0) and right after a rebalance (the committed
offsets are the group's, whoever owns the partition now). Used by `cdc-consumer lag`, by the
lag exporter (`cdc-consumer lag --serve PORT`, for alerting while the consumer is down) and by
the consumer itself (both in :mod:`consumer.ops.lag_exporter`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from confluent_kafka import OFFSET_INVALID, Consumer, ConsumerGroupTopicPartitions, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from consumer.kafka.client_config import KafkaClientConfig
from consumer.kafka.source import Partition

log = logging.getLogger(__name__)


@dataclass
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # the group's committed offset (next to read); None: never committed
    log_start: int
    high_watermark: int
    lag: int  # messages
    lag_seconds: float
    oldest_pending_ms: int | None  # Postgres commit time of the oldest change not yet committed

    def as_dict(self) -> dict:
        return asdict(self)


class LagReader:
    """Reads lag for one consumer group. Not thread-safe: one reader per thread."""

    def __init__(self, kafka: KafkaClientConfig | str, group_id: str, decoder=None, timeout: float = 10.0):
        self.kafka = KafkaClientConfig.of(kafka)
        self.group_id = group_id
        self.decoder = decoder
        self.timeout = timeout
        self.admin = AdminClient(self.kafka.client())
        self._probe: Consumer | None = None
        self._change_ms: dict[tuple[Partition, int], int | None] = {}

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    # -- what Kafka knows -----------------------------------------------------------------
    def partitions(self, topics: Iterable[str]) -> list[Partition]:
        metadata = self.admin.list_topics(timeout=self.timeout)
        return sorted((t, p) for t in topics if t in metadata.topics for p in metadata.topics[t].partitions)

    def committed(self, partitions: list[Partition]) -> dict[Partition, int | None]:
        if not partitions:
            return {}
        request = ConsumerGroupTopicPartitions(self.group_id, [TopicPartition(t, p) for t, p in partitions])
        result = self.admin.list_consumer_group_offsets([request], request_timeout=self.timeout)
        answer = result[self.group_id].result(self.timeout)
        return {
            (tp.topic, tp.partition): (None if tp.offset == OFFSET_INVALID or tp.offset < 0 else tp.offset)
            for tp in answer.topic_partitions
        }

    def offsets(self, partitions: list[Partition], spec: OffsetSpec) -> dict[Partition, int]:
        if not partitions:
            return {}
        futures = self.admin.list_offsets(
            {TopicPartition(t, p): spec for t, p in partitions}, request_timeout=self.timeout
        )
        return {(tp.topic, tp.partition): future.result(self.timeout).offset for tp, future in futures.items()}

    def members(self) -> list:
        """The group's active members (empty when no consumer runs)."""
        description = self.admin.describe_consumer_groups([self.group_id], request_timeout=self.timeout)
        return list(description[self.group_id].result(self.timeout).members)

    # -- lag --------------------------------------------------------------------------------
    def read(self, partitions: list[Partition], now: float | None = None) -> list[PartitionLag]:
        committed = self.committed(partitions)
        starts = self.offsets(partitions, OffsetSpec.earliest())
        highs = self.offsets(partitions, OffsetSpec.latest())
        now = time.time() if now is None else now
        result = []
        for partition in partitions:
            low, high, done = starts[partition], highs[partition], committed.get(partition)
            position = low if done is None or done < low else done
            lag = max(high - position, 0)
            change_ms, seconds = None, 0.0
            if lag:
                # Only markers (or an open transaction) past the committed offset: nothing to wait for.
                change_ms = self.pending_since_ms(partition, position, high)
                seconds = max(0.0, now - change_ms / 1000) if change_ms is not None else 0.0
            result.append(PartitionLag(*partition, done, low, high, lag, round(seconds, 3), change_ms))
        return result

    def pending_since_ms(self, partition: Partition, position: int, high: int) -> int | None:
        """The commit time of the first data record in [position, high), cached per position: a
        stopped group asks about the same offset over and over."""
        key = (partition, position)
        if self._change_ms.get(key) is None:  # not known yet (an open transaction may commit later)
            if len(self._change_ms) > 10_000:
                self._change_ms.clear()
            records = self._read(partition, position, high, limit=1)
            self._change_ms[key] = self._commit_ms(records[0]) if records else None
        return self._change_ms[key]

    def _commit_ms(self, message) -> int | None:
        if self.decoder is not None:
            try:
                event = self.decoder.decode(message.value())
                if event is not None and event.commit_ts_ms:
                    return int(event.commit_ts_ms)
            except Exception as exc:
                log.debug(
                    "lag: cannot decode %s[%d]@%d: %s", message.topic(), message.partition(), message.offset(), exc
                )
        kind, timestamp = message.timestamp()
        return timestamp if kind and timestamp > 0 else None

    def _read(self, partition: Partition, start: int, stop: int, limit: int | None = None) -> list:
        """Data records (not tombstones) with offsets in [start, stop), read_committed."""
        if start >= stop:
            return []
        if self._probe is None:
            self._probe = Consumer(
                self.kafka.client(
                    {
                        "group.id": f"{self.group_id}-lag-probe",  # never joined, never committed
                        "enable.auto.commit": False,
                        "isolation.level": "read_committed",
                        "enable.partition.eof": True,
                        "fetch.wait.max.ms": 50,
                    }
                )
            )
        self._probe.assign([TopicPartition(*partition, start)])
        records = []
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                message = self._probe.poll(0.5)
                if message is None:
                    continue
                if message.error():
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        break
                    log.debug("lag probe: %s", message.error())
                    continue
                if message.offset() >= stop:
                    break
                if message.value() is not None:
                    records.append(message)
                    if limit and len(records) >= limit:
                        break
                if message.offset() >= stop - 1:
                    break
        finally:
            self._probe.unassign()
        return records
