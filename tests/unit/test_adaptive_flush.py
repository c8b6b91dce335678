"""When batches are written: at once when the consumer is caught up, by size and age under load,
and never more often than the minimum interval per table."""

from __future__ import annotations

from consumer.engine.batch import BatchPolicy
from tests.fakes import FakeSink, FakeSource, fake_pipeline

HOUR = 3600.0


def started(source: FakeSource, sink: FakeSink, **policy):
    policy = {"max_age_s": HOUR, **policy}
    poll_messages = policy.pop("poll_messages", 10_000)
    pipeline = fake_pipeline(source, sink, batch=BatchPolicy(**policy), poll_messages=poll_messages)
    source.start()
    return pipeline


def test_a_caught_up_consumer_writes_at_once_not_after_the_batch_age() -> None:
    source, sink = FakeSource(end=3), FakeSink()
    pipeline = started(source, sink, min_insert_interval_s=0)
    pipeline.step()  # a poll that brought less than it asked for: nothing more is waiting
    assert sink.inserted == [0, 1, 2]
    assert source.commits == [3]


def test_a_table_is_not_written_more_often_than_the_minimum_interval() -> None:
    source, sink = FakeSource(end=6), FakeSink()
    pipeline = started(source, sink, min_insert_interval_s=HOUR)
    pipeline.step()
    pipeline.step()
    assert sink.inserted == [0, 1, 2], "the second batch waits for the table's next insert"
    assert len(sink.tokens) == 1


def test_under_load_batches_grow_until_their_size_limit() -> None:
    source, sink = FakeSource(end=9), FakeSink()
    # Every poll comes back full: more is waiting, so batches grow to max_rows.
    pipeline = started(source, sink, min_insert_interval_s=0, max_rows=6, poll_messages=3)
    pipeline.step()
    assert sink.inserted == []
    pipeline.step()
    assert sink.inserted == [0, 1, 2, 3, 4, 5]


def test_without_adaptive_flush_a_batch_waits_for_its_age() -> None:
    source, sink = FakeSource(end=3), FakeSink()
    pipeline = started(source, sink, flush_when_caught_up=False)
    pipeline.step()
    assert sink.inserted == []
