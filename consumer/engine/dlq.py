"""Dead-letter queue: a message that can never be applied goes here with the reason, and the
pipeline goes on. The original key and value are kept byte for byte, so nothing is lost.

The reason goes into a header that whoever reads the topic sees: a URL with credentials in it
(a registry error names the registry's URL) is redacted first."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from consumer.core.secrets import redact_url
from consumer.kafka.client_config import KafkaClientConfig

log = logging.getLogger(__name__)


class DeadLetterQueue:
    def __init__(self, kafka: KafkaClientConfig | str, topic: str, partitions: int = 1):
        self.topic = topic
        kafka = KafkaClientConfig.of(kafka)
        self._ensure_topic(kafka, partitions)
        self.producer = Producer(
            kafka.client(
                {
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                    "message.max.bytes": 10 * 2**20,
                }
            )
        )
        self._failures: list[str] = []

    def _ensure_topic(self, kafka: KafkaClientConfig, partitions: int) -> None:
        admin = AdminClient(kafka.client())
        if self.topic in admin.list_topics(timeout=30).topics:
            return
        futures = admin.create_topics([NewTopic(self.topic, num_partitions=partitions, replication_factor=1)])
        try:
            futures[self.topic].result(30)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise

    def send(
        self,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error_class: str,
        reason: str,
    ) -> None:
        reason = redact_url(reason)
        headers = [
            ("cdc.source.topic", source_topic.encode()),
            ("cdc.source.partition", str(partition).encode()),
            ("cdc.source.offset", str(offset).encode()),
            ("cdc.error.class", error_class.encode()),
            ("cdc.error.message", reason.encode()[:4000]),
            ("cdc.failed.at.ms", str(int(time.time() * 1000)).encode()),
        ]
        log.warning("dead-lettering %s[%d]@%d: %s: %s", source_topic, partition, offset, error_class, reason)
        self.producer.produce(self.topic, key=key, value=value, headers=headers, on_delivery=self._delivered)
        self.producer.poll(0)

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self._failures.append(str(error))

    def flush(self, timeout: float = 30.0) -> None:
        """Before committing past a dead-lettered message, it must be durable in the DLQ."""
        remaining = self.producer.flush(timeout)
        if remaining or self._failures:
            failures, self._failures = self._failures, []
            raise RuntimeError(f"DLQ delivery failed ({remaining} pending): {failures[:3]}")

    def close(self) -> None:
        self.producer.flush(30)
