"""A flush round's inserts, one per table, go to ClickHouse side by side — on the real ClickHouse,
through the real Pipeline, with Kafka stood in for by scripted logs of two topics.

What must hold: the inserts really overlap (a change waits for its own table's insert, not for the
others'), and each insert's fate is its own: one that fails is retried as it was while the other,
written, is committed — every change counted once."""

from __future__ import annotations

import threading

import pytest

from tests.test_grouped_inserts import (
    CAMPAIGNS,
    LostAnswer,
    ScriptedLog,
    aggregate_equals_facts,
    campaign,
    counted,
    impression,
    once_each,
    pipeline_on,
)

pytestmark = [pytest.mark.stack]


class ScriptedTopics:
    """Two scripted logs read by one group member: calls go to the log of the partition's topic."""

    def __init__(self, *logs: ScriptedLog):
        self.logs = {log.topic: log for log in logs}
        self.callbacks = None

    def start(self):
        self.callbacks[0]([(t, p) for t, log in self.logs.items() for p in sorted(log.log)])

    def poll(self, max_messages, timeout):
        return [m for log in self.logs.values() for m in log.poll(max_messages, timeout)]

    def position(self, partition):
        return self.logs[partition[0]].position(partition)

    def commit(self, offsets):
        for topic, log in self.logs.items():
            mine = {tp: o for tp, o in offsets.items() if tp[0] == topic}
            if mine:
                log.commit(mine)
        return True

    def pause(self, partitions):
        for t, p in partitions:
            self.logs[t].pause([(t, p)])

    def resume(self, partitions):
        for t, p in partitions:
            self.logs[t].resume([(t, p)])

    def seek(self, partition, offset):
        self.logs[partition[0]].seek(partition, offset)

    def close(self):
        pass


def two_tables(target):
    client, dlq, _, _ = target
    facts = ScriptedLog({p: [impression(100 * p + i) for i in range(3)] for p in range(2)})
    dims = ScriptedLog(
        {0: [campaign("campaign_c", 85, lsn=1_000), campaign("campaign_u", 85, lsn=2_000)]}, CAMPAIGNS.topic
    )
    pipeline = pipeline_on(ScriptedTopics(facts, dims), client, dlq)
    assert pipeline._workers is not None, "this sink takes inserts side by side"
    return client, facts, dims, pipeline


def campaigns(client) -> list[tuple]:
    return client.query(
        "SELECT id, name, startsWith(creative, '<div') FROM dim_campaign FINAL WHERE _is_deleted = 0 ORDER BY id"
    ).result_rows


def test_the_inserts_of_one_round_run_side_by_side(target) -> None:
    client, facts, dims, pipeline = two_tables(target)
    # Each insert waits inside until the other one is in flight too: one after the other, the
    # first would time out, fail, and nothing would be committed.
    both_in_flight = threading.Barrier(2, timeout=10)
    for owner, name in ((pipeline.server, "insert"), (pipeline.sink, "insert")):
        real = getattr(owner, name)

        def waiting(*args, _real=real, **kwargs):
            both_in_flight.wait()
            return _real(*args, **kwargs)

        setattr(owner, name, waiting)
    pipeline.step()
    assert pipeline.inserts == 2
    assert facts.committed == {0: 3, 1: 3} and dims.committed == {0: 2}
    assert counted(client) == once_each(facts.log)
    assert campaigns(client) == [(85, "Summer App Install - Native", 1)]
    assert aggregate_equals_facts(client)


def test_a_failed_insert_is_retried_as_it_was_while_the_other_tables_is_committed(target) -> None:
    client, facts, dims, pipeline = two_tables(target)
    real = pipeline.server.insert
    calls: list[int] = []

    def answer_lost_once(plan, segments, token):
        calls.append(len(segments))
        real(plan, segments, token)
        if len(calls) == 1:
            raise LostAnswer("connection reset after the insert was sent")

    pipeline.server.insert = answer_lost_once
    pipeline.step()
    assert dims.committed == {0: 2}, "the campaign insert was written: committed"
    assert facts.committed == {} and facts.paused == {0, 1}
    for p in range(2):  # more changes arrive while the partitions wait: they stay in Kafka
        facts.append(p, impression(100 * p + 50))
    pipeline.step()  # the same insert again (deduplicated)
    assert facts.committed == {0: 3, 1: 3}
    pipeline.step()  # the new changes
    assert calls == [2, 2, 2]
    assert counted(client) == once_each(facts.log)
    assert facts.committed == {0: 4, 1: 4} and dims.committed == {0: 2}
    assert campaigns(client) == [(85, "Summer App Install - Native", 1)]
    assert aggregate_equals_facts(client)
