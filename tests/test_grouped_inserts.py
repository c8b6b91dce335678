"""One insert per table: the batches ClickHouse decodes, of all partitions of a fact topic, go
into ClickHouse together — on the real ClickHouse, through the real Pipeline, with Kafka stood in
for by a scripted log (so a partition can be lost exactly between a failed insert and its retry).

What must hold: every change counted once, whatever the insert's fate — refused by ClickHouse
(poison in one partition), written but its answer lost, and then retried as it was, or retried
after a partition was lost or a batch grew meanwhile."""

from __future__ import annotations

import io
import uuid

import fastavro
import pytest
from confluent_kafka import Consumer, TopicPartition

from consumer.decode.envelope import EnvelopeDecoder
from consumer.decode.registry import parse_writer_schema
from consumer.engine.batch import BatchPolicy
from consumer.engine.dlq import DeadLetterQueue
from consumer.engine.pipeline import Pipeline, PipelineConfig
from consumer.sink.clickhouse import ClickHouseSink
from consumer.transform.mapping import Mapper
from tests.fakes import FakeMessage
from tests.test_server_decode import (
    IMPRESSIONS,
    MAPPING,
    PLACEHOLDER,
    fixture,
    python_rows,
    reencoded,
    stored,
)

pytestmark = [pytest.mark.stack]

TOPIC = IMPRESSIONS.topic
GOOD = fixture("impressions_c")[2]


def impression(impression_id: int) -> bytes:
    return reencoded(GOOD, lambda r: r["after"].update(id=impression_id))


class ScriptedLog:
    """The consumer side of Kafka for one topic: per partition a list of values at offsets 0.., read
    in order, with positions, pauses, seeks and commits as a group member sees them."""

    def __init__(self, partitions: dict[int, list[bytes]], topic: str = TOPIC):
        self.topic = topic
        self.log = partitions
        self.next = dict.fromkeys(partitions, 0)
        self.paused: set[int] = set()
        self.committed: dict[int, int] = {}
        self.commit_calls = 0
        self.callbacks = None

    def start(self):
        self.callbacks[0]([(self.topic, p) for p in sorted(self.log)])

    def poll(self, max_messages, timeout):
        out = []
        for p, values in sorted(self.log.items()):
            while p not in self.paused and self.next[p] < len(values):
                out.append(FakeMessage(self.next[p], p, self.topic, values[self.next[p]]))
                self.next[p] += 1
        return out

    def append(self, partition: int, value: bytes) -> None:
        self.log[partition].append(value)

    def assign(self, partition: int, values: list[bytes]) -> None:
        self.log[partition] = list(values)
        self.next[partition] = 0
        self.callbacks[0]([(self.topic, partition)])

    def lose(self, partition: int) -> None:
        """The group takes the partition without a handover (a session timeout)."""
        self.callbacks[2]([(self.topic, partition)])
        del self.log[partition]

    def position(self, partition):
        return self.next[partition[1]]

    def commit(self, offsets):
        self.commit_calls += 1
        for (_, p), offset in offsets.items():
            self.committed[p] = offset
        return True

    def pause(self, partitions):
        self.paused.update(p for _, p in partitions)

    def resume(self, partitions):
        self.paused.difference_update(p for _, p in partitions)

    def seek(self, partition, offset):
        self.next[partition[1]] = offset

    def close(self):
        pass


class FixtureSchemas:
    """The registry, for the writer schemas of the captured envelopes."""

    def schema(self, schema_id: int) -> dict:
        for name in ("impressions_c", "campaign_c"):
            schema, known, _ = fixture(name)
            if known == schema_id:
                return parse_writer_schema(schema)
        raise KeyError(schema_id)


class LostAnswer(Exception):
    """The insert reached ClickHouse, its answer did not reach us."""


@pytest.fixture
def target(stack, clickhouse):
    dlq_topic = f"{clickhouse.database}.dlq"
    return clickhouse, DeadLetterQueue(stack.kafka_bootstrap, dlq_topic), dlq_topic, stack.kafka_bootstrap


def pipeline_on(source: ScriptedLog, client, dlq) -> Pipeline:
    def factory(on_assign, on_revoke, on_lost):
        source.callbacks = (on_assign, on_revoke, on_lost)
        return source

    # Every step writes what it read; a failed insert is retried at the next step.
    config = PipelineConfig(batch=BatchPolicy(max_age_s=0), poll_timeout_s=0, retry_base_s=0, retry_max_s=0)
    pipeline = Pipeline(
        source_factory=factory,
        decoder=EnvelopeDecoder(FixtureSchemas(), toast_placeholder=PLACEHOLDER),
        mapper=Mapper(MAPPING),
        sink=ClickHouseSink(client),
        dlq=dlq,
        config=config,
    )
    assert pipeline.clickhouse is not None, "the ClickHouse lane applies to this sink"
    source.start()
    return pipeline


def counted(client) -> dict[tuple[int, int], int]:
    """(partition, offset) -> how many times its change is in the facts (sum of signs)."""
    rows = client.query(f"SELECT _partition, _offset, sum(_sign) FROM {IMPRESSIONS.table} GROUP BY 1, 2").result_rows
    return {(int(p), int(o)): int(n) for p, o, n in rows}


def aggregate_equals_facts(client) -> bool:
    aggregate = client.query("SELECT sum(impressions), sum(spend) FROM agg_campaign_daily").result_rows[0]
    facts = client.query(f"SELECT sum(_sign), sum(_sign * cost) FROM {IMPRESSIONS.table}").result_rows[0]
    return tuple(aggregate) == tuple(facts)


def once_each(log: dict[int, list[bytes]]) -> dict[tuple[int, int], int]:
    return {(p, o): 1 for p, values in log.items() for o in range(len(values))}


def started(target, partitions: int) -> tuple[ScriptedLog, Pipeline, list[int]]:
    """Three changes in each partition; the first insert is written, but its answer lost."""
    client, dlq, _, _ = target
    log = {p: [impression(100 * p + i) for i in range(3)] for p in range(partitions)}
    source = ScriptedLog({p: list(v) for p, v in log.items()})
    pipeline = pipeline_on(source, client, dlq)
    calls = answer_lost_once(pipeline)
    pipeline.step()
    return source, pipeline, calls


def test_the_batches_of_all_partitions_of_a_table_go_in_one_insert(target) -> None:
    client, dlq, _, _ = target
    log = {p: [impression(100 * p + i) for i in range(3)] for p in range(4)}
    source = ScriptedLog({p: list(v) for p, v in log.items()})
    pipeline = pipeline_on(source, client, dlq)
    pipeline.step()
    assert pipeline.report.inserts == 1 and source.commit_calls == 1
    assert source.committed == dict.fromkeys(range(4), 3)
    assert counted(client) == once_each(log)
    assert stored(client) == sorted(r for p, values in log.items() for r in python_rows(values, [0, 1, 2], p))
    assert aggregate_equals_facts(client)


def test_poison_in_one_partition_leaves_the_others_fast_and_is_dead_lettered(target) -> None:
    client, dlq, dlq_topic, bootstrap = target
    poison = GOOD + b"\x02\x04"  # trailing bytes: Python's decoder refuses it, ClickHouse too
    log = {p: [impression(100 * p + i) for i in range(3)] for p in range(3)}
    log[1][1] = poison
    source = ScriptedLog({p: list(v) for p, v in log.items()})
    pipeline = pipeline_on(source, client, dlq)
    pipeline.step()
    dlq.flush()
    expected = once_each(log)
    del expected[(1, 1)]
    assert counted(client) == expected
    assert source.committed == dict.fromkeys(range(3), 3)
    assert aggregate_equals_facts(client)
    assert dead_lettered(bootstrap, dlq_topic) == [(TOPIC, 1, 1)]


def dead_lettered(bootstrap: str, topic: str) -> list[tuple[str, int, int]]:
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    reader.assign([TopicPartition(topic, 0, 0)])
    found = []
    try:
        for _ in range(20):
            for m in reader.consume(100, timeout=0.5):
                if m.error() is None:
                    headers = dict(m.headers() or [])
                    found.append(
                        (
                            headers["cdc.source.topic"].decode(),
                            int(headers["cdc.source.partition"]),
                            int(headers["cdc.source.offset"]),
                        )
                    )
            if found:
                return found
    finally:
        reader.close()
    return found


def answer_lost_once(pipeline: Pipeline) -> list[int]:
    """The next insert is written, but the pipeline hears only an error."""
    real = pipeline.clickhouse.servers[0].insert  # one server: its only shard
    calls: list[int] = []

    def insert(plan, segments, token):
        calls.append(len(segments))
        real(plan, segments, token)
        if len(calls) == 1:
            raise LostAnswer("connection reset after the insert was sent")

    pipeline.clickhouse.servers[0].insert = insert
    return calls


def test_an_insert_whose_answer_was_lost_is_sent_again_as_it_was(target) -> None:
    client = target[0]
    source, pipeline, calls = started(target, partitions=3)
    assert source.committed == {} and source.paused == {0, 1, 2}
    for p in range(3):  # more changes arrive while the partitions wait: they stay in Kafka
        source.append(p, impression(100 * p + 50))
    pipeline.step()  # resumes and sends the same insert (deduplicated)
    assert source.committed == dict.fromkeys(range(3), 3)
    pipeline.step()  # the new changes
    assert calls == [3, 3, 3]
    assert counted(client) == once_each(source.log)
    assert source.committed == dict.fromkeys(range(3), 4)
    assert aggregate_equals_facts(client)


def test_a_partition_gained_before_the_retry_does_not_join_the_failed_insert(target) -> None:
    client = target[0]
    source, pipeline, calls = started(target, partitions=2)
    source.assign(2, [impression(200 + i) for i in range(3)])
    pipeline.step()  # reads partition 2; the failed insert goes again as it was, then partition 2's
    assert calls == [2, 2, 1]
    assert counted(client) == once_each(source.log)
    assert source.committed == dict.fromkeys(range(3), 3)


def test_a_partition_lost_before_the_retry_leaves_the_others_counted_once(target) -> None:
    client = target[0]
    source, pipeline, calls = started(target, partitions=3)
    expected = once_each(source.log)
    source.lose(2)  # its next owner skips what ClickHouse holds (the watermark)
    pipeline.step()
    assert counted(client) == expected
    assert source.committed == {0: 3, 1: 3}
    assert calls == [3], "the written insert is not sent again in another shape"


def test_a_batch_that_grew_after_the_failure_adds_only_its_new_changes(target) -> None:
    client = target[0]
    source, pipeline, calls = started(target, partitions=2)
    # A change of partition 0 joins its batch after the failure (as when the failure happened
    # while the rest of a poll was still being handed to the batches).
    source.append(0, impression(99))
    source.resume([(TOPIC, 0)])
    pipeline.offer(source.poll(10, 0)[0])
    pipeline.step()
    assert calls == [2, 1], "only the new change is sent"
    assert counted(client) == once_each(source.log)
    assert source.committed == {0: 4, 1: 3}
    assert aggregate_equals_facts(client)


CAMPAIGNS = MAPPING.for_topic("adtech.public.campaign")


def campaign(name: str, campaign_id: int, lsn: int) -> bytes:
    def change(record: dict) -> None:
        record["after"]["id"] = campaign_id
        record["source"]["lsn"] = lsn

    return reencoded_as(name, change)


def reencoded_as(name: str, change) -> bytes:
    schema, _, value = fixture(name)
    writer = parse_writer_schema(schema)
    record = fastavro.schemaless_reader(io.BytesIO(value[5:]), writer)
    change(record)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, writer, record)
    return value[:5] + out.getvalue()


def test_dimension_batches_of_all_partitions_go_in_one_insert_and_unknown_previous_values_are_dead_lettered(
    target,
) -> None:
    client, dlq, dlq_topic, bootstrap = target
    log = {
        # The update's unchanged creative comes from the row before it.
        0: [campaign("campaign_c", 85, lsn=1_000), campaign("campaign_u", 85, lsn=2_000)],
        1: [campaign("campaign_u", 84, lsn=1_500)],  # a campaign never seen: its creative is known nowhere
        2: [campaign("campaign_c", 86, lsn=1_200)],
    }
    source = ScriptedLog({p: list(v) for p, v in log.items()}, topic=CAMPAIGNS.topic)
    pipeline = pipeline_on(source, client, dlq)
    pipeline.step()
    dlq.flush()
    assert pipeline.report.inserts == 1 and source.committed == {0: 2, 1: 1, 2: 1}
    assert dead_lettered(bootstrap, dlq_topic) == [(CAMPAIGNS.topic, 1, 0)]
    rows = client.query(
        "SELECT id, name, startsWith(creative, '<div') FROM dim_campaign FINAL WHERE _is_deleted = 0 ORDER BY id"
    ).result_rows
    assert rows == [(85, "Summer App Install - Native", 1), (86, "Back to School Retargeting - Display", 1)]


def test_unchanged_columns_come_from_the_row_last_applied_until_the_partition_changes_hands(target) -> None:
    """The rows last applied from a partition fill the next change's unchanged creative: shown by
    taking them out of ClickHouse, which then could not. A new assignment starts without them."""
    client, dlq, dlq_topic, bootstrap = target
    source = ScriptedLog({0: [campaign("campaign_c", 85, lsn=1_000)]}, topic=CAMPAIGNS.topic)
    pipeline = pipeline_on(source, client, dlq)
    pipeline.step()
    client.command("TRUNCATE TABLE dim_campaign")
    source.append(0, campaign("campaign_u", 85, lsn=2_000))
    pipeline.step()
    creative = "SELECT startsWith(creative, '<div') FROM dim_campaign FINAL WHERE id = 85 AND _is_deleted = 0"
    assert client.query(creative).result_rows == [(1,)]

    source.lose(0)
    source.assign(0, [campaign("campaign_c", 85, lsn=1_000), campaign("campaign_u", 85, lsn=2_000)])
    client.command("TRUNCATE TABLE dim_campaign")  # after the watermark (offset 1) was read
    source.append(0, campaign("campaign_u", 85, lsn=3_000))
    pipeline.step()
    dlq.flush()
    assert source.committed == {0: 3}
    assert dead_lettered(bootstrap, dlq_topic) == [(CAMPAIGNS.topic, 0, 2)]  # and not offset 1
