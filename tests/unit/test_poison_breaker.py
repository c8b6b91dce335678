"""The poison breaker: dead-letter a few bad messages, but not a topic of them."""

from __future__ import annotations

from consumer.core.errors import DecodeError
from consumer.engine.breaker import PoisonBreaker
from consumer.ops import metrics
from tests.fakes import FakeSink, FakeSource, fake_pipeline


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_over_the_share_and_minimum_then_closes_after_the_window() -> None:
    clock = Clock()
    breaker = PoisonBreaker(share=0.5, min_poison=3, window_s=60, clock=clock)
    breaker.read("t", 4)
    assert not breaker.poison("t") and not breaker.poison("t"), "below the minimum count"
    assert breaker.poison("t"), "3 of 4 messages are poison"
    assert metrics.poison_breaker_open.labels("t")._value.get() == 1
    assert breaker.hold_s("t") == 60
    clock.now += 61
    assert breaker.hold_s("t") == 0
    assert metrics.poison_breaker_open.labels("t")._value.get() == 0
    assert not breaker.poison("t"), "a fresh window"


def test_a_few_poison_messages_among_many_good_ones_are_dead_lettered() -> None:
    breaker = PoisonBreaker(share=0.5, min_poison=3, window_s=60, clock=Clock())
    breaker.read("t", 1000)
    assert not any(breaker.poison("t") for _ in range(10))


def test_old_seconds_leave_the_window() -> None:
    clock = Clock()
    breaker = PoisonBreaker(share=0.5, min_poison=2, window_s=10, clock=clock)
    assert not breaker.poison("t")
    clock.now += 11
    breaker.read("t", 1)
    assert not breaker.poison("t"), "the first poison is out of the window"


class PoisonDecoder:
    def decode(self, value):
        raise DecodeError("invalid_json", "not JSON")


def test_a_topic_of_poison_waits_instead_of_filling_the_dead_letter_topic() -> None:
    source, sink = FakeSource(end=50), FakeSink()
    pipeline = fake_pipeline(source, sink, PoisonDecoder(), poison_breaker_min_messages=5, poison_breaker_window_s=3600)
    source.start()
    for _ in range(30):
        pipeline.step()
    assert len(pipeline.dlq.sent) == 4, "the fifth poison message opens the breaker"
    assert not pipeline.ready and max(source.commits) <= 4, "nothing committed past the waiting message"
