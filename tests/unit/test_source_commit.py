"""Commit errors of a broker restart (the coordinator moving or loading) are not fatal: the commit
is skipped and the next one carries a later offset. Found by the fault suite: the consumer exited
with NOT_COORDINATOR when the Kafka broker restarted under traffic."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from consumer.kafka.source import KafkaSource, SourceConfig


class RefusingConsumer:
    def __init__(self, code: int):
        self.code = code

    def commit(self, offsets, asynchronous):
        raise KafkaException(KafkaError(self.code))


def source_refusing(code: int) -> KafkaSource:
    source = KafkaSource(SourceConfig("127.0.0.1:1", "g", ["t"]), None, None, None)
    source.consumer.close()
    source.consumer = RefusingConsumer(code)
    return source


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError._TRANSPORT,
        KafkaError.ILLEGAL_GENERATION,
    ],
)
def test_a_commit_the_coordinator_cannot_take_now_is_skipped(code) -> None:
    assert source_refusing(code).commit({("t", 0): 5}) is False


def test_other_commit_errors_still_raise() -> None:
    with pytest.raises(KafkaException):
        source_refusing(KafkaError.GROUP_AUTHORIZATION_FAILED).commit({("t", 0): 5})
