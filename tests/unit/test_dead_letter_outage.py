"""A dead-letter topic that cannot store a record holds the pipeline back like ClickHouse does:
nothing past the poison message is written or committed until the record is stored."""

from __future__ import annotations

from consumer.core.errors import DeadLetterUnavailable, DecodeError
from consumer.engine.batch import BatchPolicy
from consumer.engine.dlq import BROKER_DEFAULT_BYTES, MAX_MESSAGE_BYTES, fit_record
from tests.fakes import DeadLetters, FakeDecoder, FakeSink, FakeSource, fake_pipeline


class OneBadMessage(FakeDecoder):
    def decode(self, value):
        if value == b"bad":
            raise DecodeError("invalid_json", "not JSON")
        return super().decode(value)


class BadAt(FakeSource):
    def poll(self, max_messages, timeout):
        messages = super().poll(max_messages, timeout)
        for message in messages:
            if message.offset() == 1:
                message._value = b"bad"
        return messages


class BrokersDown(DeadLetters):
    def __init__(self, outage: int):
        super().__init__()
        self.outage = outage

    def flush(self, timeout: float = 30.0) -> None:
        if self.sent and self.outage:
            self.outage -= 1
            raise DeadLetterUnavailable("1 dead-letter record(s) not stored: Local: Broker transport failure")
        super().flush(timeout)


def test_nothing_past_an_unstored_dead_letter_is_written_or_committed() -> None:
    source, sink = BadAt(end=6), FakeSink()
    dlq = BrokersDown(outage=3)
    pipeline = fake_pipeline(source, sink, OneBadMessage(), dlq=dlq, retry_base_s=0, batch=BatchPolicy(max_age_s=0))
    source.start()
    for _ in range(3):
        pipeline.step()
        assert sink.inserted == [] and source.commits == [] and not pipeline.ready
    for _ in range(5):
        pipeline.step()
    assert [r["offset"] for r in dlq.durable] == [1]
    assert sink.inserted == [0, 2, 3, 4, 5] and source.commits[-1] == 6 and pipeline.ready


def test_a_value_too_large_for_the_topic_is_cut_with_its_size_and_digest() -> None:
    headers: list[tuple[str, bytes]] = []
    value = b"x" * (MAX_MESSAGE_BYTES + 5)
    key, cut = fit_record(b"k", value, headers)
    assert key == b"k" and len(cut) < MAX_MESSAGE_BYTES and value.startswith(cut)
    found = dict(headers)
    assert found["cdc.original.value.bytes"] == str(len(value)).encode()
    assert len(found["cdc.original.value.sha256"]) == 64 and found["cdc.value.truncated"] == b"true"
    # A topic that refused it as too large: cut again to the brokers' default, headers kept once.
    _, smaller = fit_record(key, cut, headers, BROKER_DEFAULT_BYTES)
    assert len(smaller) < BROKER_DEFAULT_BYTES and dict(headers) == found and len(headers) == 3
