"""SOURCE stage: a Kafka consumer-group member that never commits on its own.

Offsets are committed only through `commit`, by the pipeline, after ClickHouse holds the
rows. Rebalance callbacks hand the pipeline the partitions it gains and loses, so it can
flush and commit before a partition goes to another member.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumer.kafka.client_config import KafkaClientConfig

log = logging.getLogger(__name__)

Partition = tuple[str, int]
REBALANCE_ERRORS = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError._ASSIGNMENT_LOST,
    KafkaError._STATE,
}
# The coordinator is moving or unreachable (a broker restart): the commit may succeed later.
TRANSIENT_COMMIT_ERRORS = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._WAIT_COORD,
    KafkaError._ALL_BROKERS_DOWN,
}


@dataclass(frozen=True)
class SourceConfig:
    kafka: KafkaClientConfig | str  # the shared client properties, or a bare bootstrap (plaintext)
    group_id: str
    topics: list[str]
    client_id: str = "cdc-consumer"
    session_timeout_ms: int = 45_000
    group_instance_id: str | None = None  # static membership
    max_poll_interval_ms: int = 300_000
    auto_offset_reset: str = "earliest"
    # How soon a topic created after the start, or partitions added to a topic, join the
    # assignment: librdkafka notices them only when it rereads the topic metadata, every 5 min by
    # default (a consumer started before Debezium created the fact topics wrote no facts for that
    # long). A metadata request per few seconds is nothing to the brokers.
    metadata_refresh_ms: int = 5_000


class KafkaSource:
    def __init__(
        self,
        config: SourceConfig,
        on_assign: Callable[[list[Partition]], None],
        on_revoke: Callable[[list[Partition]], None],
        on_lost: Callable[[list[Partition]], None],
    ):
        self.config = config
        self._behind = True
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self.consumer = Consumer(
            KafkaClientConfig.of(config.kafka).client(
                {
                    "group.id": config.group_id,
                    "client.id": config.client_id,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": config.auto_offset_reset,
                    # Debezium with exactly-once source support writes in transactions: read only committed ones.
                    "isolation.level": "read_committed",
                    "partition.assignment.strategy": "cooperative-sticky",
                    "session.timeout.ms": config.session_timeout_ms,
                    "max.poll.interval.ms": config.max_poll_interval_ms,
                    "enable.partition.eof": False,
                    "topic.metadata.refresh.interval.ms": config.metadata_refresh_ms,
                    **({"group.instance.id": config.group_instance_id} if config.group_instance_id else {}),
                },
                defaults={
                    # With its local queue full (queued.min.messages), librdkafka waits this long
                    # before fetching again, 1 s by default: behind, the loop drains the queue in
                    # a fraction of that and then polls nothing (a fresh group read 150-180k
                    # messages/s with the default, 400k/s with 20 ms).
                    "fetch.queue.backoff.ms": 20,
                },
            )
        )

    def start(self) -> None:
        self.consumer.subscribe(
            self.config.topics,
            on_assign=lambda _c, parts: self._on_assign([(p.topic, p.partition) for p in parts]),
            on_revoke=lambda _c, parts: self._on_revoke([(p.topic, p.partition) for p in parts]),
            on_lost=lambda _c, parts: self._on_lost([(p.topic, p.partition) for p in parts]),
        )

    def poll(self, max_messages: int, timeout: float) -> list[Message]:
        """Up to `max_messages`. librdkafka's batch consume waits out its whole timeout unless
        the batch fills: behind (the last poll filled), that wait fills the next batch; caught
        up, it would be added to every change's latency, so the wait is for the first message
        only, and the rest is what is already queued."""
        if self._behind:
            messages = self.consumer.consume(max_messages, timeout=timeout)
        else:
            first = self.consumer.poll(timeout)
            messages = [] if first is None else [first]
            if messages and max_messages > 1:
                messages += self.consumer.consume(max_messages - 1, timeout=0)
        self._behind = len(messages) >= max_messages
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.fatal():
                raise KafkaException(error)
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("Kafka: %s", error)
        return good

    def commit(self, offsets: dict[Partition, int]) -> bool:
        """Synchronously commit `next offset to read` per partition. False when the group has
        moved on (a rebalance took the partitions), or the coordinator cannot take the commit
        right now (a broker restart): the next owner, or the next commit, re-reads from the last
        committed offset, which the applied watermark makes harmless."""
        if not offsets:
            return True
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() in REBALANCE_ERRORS:
                log.warning("commit of %s skipped: %s", sorted(offsets), error.str())
                return False
            if error.code() in TRANSIENT_COMMIT_ERRORS or error.retriable():
                # Not committed *now*: a later commit of this partition carries a later offset,
                # and whatever is re-read in between is below the applied watermark.
                log.warning("commit of %s failed, retried with the next one: %s", sorted(offsets), error.str())
                return False
            raise
        return True

    def position(self, partition: Partition) -> int | None:
        """Next offset the consumer will return; past transaction markers, unlike last offset + 1."""
        (tp,) = self.consumer.position([TopicPartition(*partition)])
        return None if tp.offset < 0 else tp.offset

    def committed(self, partitions: list[Partition]) -> dict[Partition, int | None]:
        result = self.consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=30)
        return {(tp.topic, tp.partition): (None if tp.offset == OFFSET_INVALID else tp.offset) for tp in result}

    def seek(self, partition: Partition, offset: int) -> None:
        self.consumer.seek(TopicPartition(partition[0], partition[1], offset))

    def pause(self, partitions: list[Partition]) -> None:
        if partitions:
            self.consumer.pause([TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions: list[Partition]) -> None:
        if partitions:
            self.consumer.resume([TopicPartition(t, p) for t, p in partitions])

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception as exc:  # librdkafka raises several types here
            # Closing leaves the group; a rebalance racing it changes nothing we rely on.
            log.warning("closing the consumer: %s", exc)
