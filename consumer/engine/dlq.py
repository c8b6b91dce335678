"""Dead-letter queue: a message that can never be applied goes here with the reason, and the
pipeline goes on. The original key and value are kept byte for byte, so nothing is lost: a value
too large for the topic (with its headers) is stored cut to fit, with headers giving its size,
its SHA-256 and its source coordinates, where the whole of it still lies.

A record stays with this object until the topic acknowledged it. `flush` is called before
anything past a dead-lettered message is written to ClickHouse: when the topic cannot take the
record (the brokers are down, the record is refused), `flush` raises DeadLetterUnavailable, the
engine backs off as it does for ClickHouse, and the records are sent again at the next flush.

The reason goes into a header that whoever reads the topic sees: a URL with credentials in it
(a registry error names the registry's URL) is redacted first."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from consumer.core.errors import DeadLetterUnavailable
from consumer.core.secrets import redact_url
from consumer.kafka.client_config import KafkaClientConfig

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 10 * 2**20  # the DLQ topic's max.message.bytes (set when this creates it)
# An existing topic may take less: a record it refuses as too large is cut to the brokers' default.
BROKER_DEFAULT_BYTES = 2**20
# What a record's headers, key and framing may take besides its value.
HEADROOM_BYTES = 64 * 2**10
REASON_BYTES = 4000
KEY_BYTES = 16 * 2**10


@dataclass
class _Record:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    delivered: bool = False
    error: str | None = None  # the last delivery failure
    too_large: bool = False
    in_flight: bool = False


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
                    "message.max.bytes": MAX_MESSAGE_BYTES,
                }
            )
        )
        self._pending: list[_Record] = []
        # Tables' inserts run side by side (consumer.engine.pipeline), and each may dead-letter.
        self._lock = threading.RLock()

    def _ensure_topic(self, kafka: KafkaClientConfig, partitions: int) -> None:
        admin = AdminClient(kafka.client())
        if self.topic in admin.list_topics(timeout=30).topics:
            return
        topic = NewTopic(
            self.topic,
            num_partitions=partitions,
            replication_factor=-1,  # the brokers' default
            config={"max.message.bytes": str(MAX_MESSAGE_BYTES)},
        )
        try:
            admin.create_topics([topic])[self.topic].result(30)
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
            ("cdc.error.message", reason.encode()[:REASON_BYTES]),
            ("cdc.failed.at.ms", str(int(time.time() * 1000)).encode()),
        ]
        key, value = fit_record(key, value, headers)
        log.warning("dead-lettering %s[%d]@%d: %s: %s", source_topic, partition, offset, error_class, reason[:500])
        record = _Record(key, value, headers)
        with self._lock:
            self._pending.append(record)
            self._produce(record)

    def _produce(self, record: _Record) -> None:
        def delivered(error, _message) -> None:
            record.in_flight = False
            record.delivered = error is None
            record.error = None if error is None else str(error)
            record.too_large = error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE

        try:
            self.producer.produce(
                self.topic, key=record.key, value=record.value, headers=record.headers, on_delivery=delivered
            )
            record.in_flight = True
        except (BufferError, KafkaException) as exc:  # the local queue is full, or the client refused
            record.error = str(exc)
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Returns once every record sent so far is stored in the topic; DeadLetterUnavailable
        otherwise (the undelivered ones are kept, and sent again)."""
        with self._lock:
            self._flush(timeout)

    def _flush(self, timeout: float) -> None:
        if not self._pending:
            return
        self.producer.flush(timeout)
        undelivered = [r for r in self._pending if not r.delivered]
        if not undelivered:
            self._pending.clear()
            return
        errors = sorted({r.error or "no answer" for r in undelivered})
        for record in undelivered:
            if record.too_large:
                record.key, record.value = fit_record(record.key, record.value, record.headers, BROKER_DEFAULT_BYTES)
            if not record.in_flight:
                self._produce(record)
        self._pending = undelivered
        raise DeadLetterUnavailable(f"{len(undelivered)} dead-letter record(s) not stored: {'; '.join(errors[:3])}")

    def close(self) -> None:
        self.producer.flush(30)


def fit_record(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], limit: int = MAX_MESSAGE_BYTES
) -> tuple[bytes | None, bytes | None]:
    """The key and value as they fit one record of `limit` bytes: cut, with headers saying so
    (the first cut's: a second one keeps the original's size and digest)."""
    cut = {name for name, _ in headers}
    if key is not None and len(key) > KEY_BYTES:
        if "cdc.key.truncated" not in cut:
            headers += _cut_headers("key", key)
        key = key[:KEY_BYTES]
    room = limit - HEADROOM_BYTES - (len(key) if key else 0)
    if value is not None and len(value) > room:
        if "cdc.value.truncated" not in cut:
            headers += _cut_headers("value", value)
        value = value[:room]
    return key, value


def _cut_headers(part: str, data: bytes) -> list[tuple[str, bytes]]:
    return [
        (f"cdc.original.{part}.bytes", str(len(data)).encode()),
        (f"cdc.original.{part}.sha256", hashlib.sha256(data).hexdigest().encode()),
        (f"cdc.{part}.truncated", b"true"),
    ]
