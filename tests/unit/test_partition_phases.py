"""The partition state machine, without Kafka: each transition and the phase it leads to."""

from __future__ import annotations

from consumer.engine.batch import PartitionBatch
from consumer.engine.partition import PartitionState, Phase
from consumer.transform.mapping import load_mapping

IMPRESSIONS = load_mapping().for_topic("adtech.public.impressions")


def new_state() -> PartitionState:
    return PartitionState(("adtech.public.impressions", 0), PartitionBatch(IMPRESSIONS, IMPRESSIONS.topic, 0), -1)


def test_a_failed_insert_backs_off_then_recovers_until_a_batch_is_applied() -> None:
    state = new_state()
    assert state.phase is Phase.ACTIVE and state.ready
    assert state.insert_failed(until=10.0), "the source must pause it"
    assert state.phase is Phase.BACKING_OFF and not state.ready
    assert not state.due(now=9.9)
    assert state.due(now=10.0), "the source must resume it"
    assert state.phase is Phase.RECOVERING and not state.ready
    state.batch.add(5, [("row",)], 10, None)
    state.batch_applied()
    assert state.phase is Phase.ACTIVE and state.ready
    assert state.watermark == 5 and state.batch.messages == 0


def test_backpressure_holds_a_healthy_partition_without_making_it_recover() -> None:
    state = new_state()
    assert state.hold(until=3.0)
    assert state.phase is Phase.BACKING_OFF
    assert not state.hold(until=5.0), "already paused: no second pause at the source"
    assert not state.due(now=4.0), "the later retry time wins"
    assert state.due(now=5.0)
    assert state.phase is Phase.ACTIVE


def test_a_message_that_cannot_be_applied_yet_waits_until_one_goes_through() -> None:
    state = new_state()
    assert state.wait(until=1.0)
    assert state.phase is Phase.WAITING
    assert state.due(now=1.0)
    assert state.phase is Phase.RECOVERING
    state.message_applied()
    assert state.phase is Phase.ACTIVE


def test_consecutive_failures_are_counted_and_reset_by_an_applied_batch() -> None:
    state = new_state()
    state.insert_failed(until=1.0)
    state.due(now=1.0)
    state.insert_failed(until=2.0)
    assert state.failures == 2 and state.phase is Phase.BACKING_OFF
    state.due(now=2.0)
    state.batch_applied()
    assert state.failures == 0 and state.phase is Phase.ACTIVE


def test_finished_is_final_and_ready() -> None:
    state = new_state()
    state.finish()
    assert state.phase is Phase.FINISHED and state.ready
