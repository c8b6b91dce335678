"""The source's poll against the stack's Kafka: caught up, a change is handed over as soon as it
arrives, not when the poll's timeout ends (librdkafka's batch consume waits the timeout out
unless the batch fills); behind, every message still comes once, in order."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from consumer.kafka.source import KafkaSource, SourceConfig

pytestmark = pytest.mark.stack

TIMEOUT_S = 30.0


@pytest.fixture
def topic(stack):
    name = f"poll-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(30)
    yield name
    admin.delete_topics([name])[name].result(30)


@pytest.fixture
def source(stack, topic):
    assigned = threading.Event()
    source = KafkaSource(
        SourceConfig(stack.kafka_bootstrap, f"poll-{uuid.uuid4().hex[:8]}", [topic]),
        on_assign=lambda _partitions: assigned.set(),
        on_revoke=lambda _partitions: None,
        on_lost=lambda _partitions: None,
    )
    source.start()
    deadline = time.monotonic() + 60
    while not assigned.is_set() and time.monotonic() < deadline:
        assert source.poll(100, timeout=0.5) == []
    assert assigned.is_set(), "no partition assigned within 60 s"
    yield source
    source.close()


def produce(bootstrap: str, topic: str, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(count):
        producer.produce(topic, value=str(i).encode())
    assert producer.flush(30) == 0


def test_caught_up_a_lone_change_is_returned_when_it_arrives_not_at_the_timeout(stack, topic, source) -> None:
    sender = threading.Timer(1.0, produce, args=(stack.kafka_bootstrap, topic, 1))
    sender.start()
    started = time.monotonic()
    messages = source.poll(10_000, timeout=TIMEOUT_S)
    waited = time.monotonic() - started
    sender.join()
    assert [m.value() for m in messages] == [b"0"]
    assert waited < TIMEOUT_S / 2, f"the poll returned its one message after {waited:.1f} s"


def test_behind_every_message_comes_once_in_order_in_batches_of_at_most_the_maximum(stack, topic, source) -> None:
    produce(stack.kafka_bootstrap, topic, 5_000)
    received: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(received) < 5_000 and time.monotonic() < deadline:
        batch = source.poll(1_000, timeout=1.0)
        assert len(batch) <= 1_000
        received += [m.value() for m in batch]
    assert received == [str(i).encode() for i in range(5_000)]
