"""Rows ClickHouse refuses for their data: the batch is bisected, the refused messages are
dead-lettered, everything else is applied once and in offset order, and nothing stalls."""

from __future__ import annotations

from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from consumer.engine.batch import BatchPolicy
from tests.fakes import FakeSink, FakeSource, fake_pipeline


class RefusingSink(FakeSink):
    """Refuses any insert holding a row of a `poison` offset, as the client does for a value its
    column cannot hold; records the DLQ's durable offsets at each insert."""

    def __init__(self, poison: set[int], error: Exception):
        super().__init__()
        self.poison, self.error = poison, error
        self.durable_at_insert: list[tuple[list[int], set[int]]] = []
        self.dlq = None

    def insert(self, table, column_names, rows, token, *args, **kwargs):
        offsets = [row[column_names.index("_offset")] for row in rows]
        if self.poison & set(offsets):
            raise self.error
        self.durable_at_insert.append((offsets, {r["offset"] for r in self.dlq.durable}))
        super().insert(table, column_names, rows, token, *args, **kwargs)


def run(poison: set[int], error: Exception, end: int = 12):
    source, sink = FakeSource(end=end), RefusingSink(poison, error)
    pipeline = fake_pipeline(source, sink, retry_base_s=0, batch=BatchPolicy(max_age_s=0, max_rows=6))
    sink.dlq = pipeline.dlq
    source.start()
    for _ in range(12):
        pipeline.step()
    return pipeline, source, sink


def test_refused_messages_are_dead_lettered_and_the_rest_applied_in_order() -> None:
    pipeline, source, sink = run({4, 9}, ValueError("int too big to convert"))
    assert sink.inserted == [o for o in range(12) if o not in (4, 9)]
    assert sorted(r["offset"] for r in pipeline.dlq.sent) == [4, 9]
    assert {r["error_class"] for r in pipeline.dlq.sent} == {"clickhouse_refused"}
    assert source.commits[-1] == 12 and pipeline.ready


def test_nothing_past_a_refused_message_is_written_before_the_dlq_holds_it() -> None:
    _, _, sink = run({4}, ValueError("surrogates not allowed"))
    for offsets, durable in sink.durable_at_insert:
        if max(offsets) > 4:
            assert 4 in durable, offsets


def test_clickhouse_own_refusal_by_name_is_bisected_too() -> None:
    error = DatabaseError("Code: 321. VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE", name="VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE")
    pipeline, _, sink = run({7}, error)
    assert [r["offset"] for r in pipeline.dlq.sent] == [7]
    assert 7 not in sink.inserted and len(sink.inserted) == 11


def test_an_unreachable_clickhouse_is_retried_not_bisected() -> None:
    pipeline, source, sink = run({3}, OperationalError("connection refused"))
    assert pipeline.dlq.sent == [] and sink.inserted == [0, 1, 2], "nothing from offset 3 on"
    assert not pipeline.ready and source.commits == [3]
