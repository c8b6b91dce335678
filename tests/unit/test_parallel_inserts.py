"""Tables due at once are written side by side: a burst of changes to several tables costs the
slowest insert, not their sum. Each insert is still concluded on its own: its partitions are
committed after it returned, and a failed one backs off alone."""

from __future__ import annotations

import threading

from consumer.engine.batch import BatchPolicy
from tests.fakes import FakeDecoder, FakeSink, LogSource, RowsMapper, log_pipeline, one_null_row

IMPRESSIONS, CLICKS = ("adtech.public.impressions", 0), ("adtech.public.clicks", 0)


class MeetingSink(FakeSink):
    """A sink whose inserts return only once every table's insert has arrived, or fail after
    `patience` seconds: written one after another, the first insert waits in vain."""

    def __init__(self, tables: int, patience: float = 5.0, failing: str | None = None):
        super().__init__()
        self.meeting = threading.Barrier(tables, timeout=patience)
        self.failing = failing
        self.tables: list[str] = []

    def insert(self, table, column_names, rows, token, *args, **kwargs):
        self.meeting.wait()
        if table.table == self.failing:
            raise ConnectionError(f"{table.table}: connection reset")
        super().insert(table, column_names, rows, token)
        self.tables.append(table.table)


def _pipeline(sink, **config):
    source = LogSource({IMPRESSIONS: [b"x"] * 3, CLICKS: [b"x"] * 2})
    pipeline = log_pipeline(
        source,
        FakeDecoder(),
        sink,
        mapper=RowsMapper(one_null_row),
        batch=BatchPolicy(max_age_s=3600, min_insert_interval_s=0),
        server_decode=False,
        **config,
    )
    source.start()
    return pipeline, source


def test_tables_due_at_once_are_inserted_side_by_side_and_each_committed() -> None:
    sink = MeetingSink(tables=2)
    pipeline, source = _pipeline(sink)
    pipeline.step()
    assert sorted(sink.tables) == ["fact_clicks", "fact_impressions"]
    assert source.committed == {IMPRESSIONS: 3, CLICKS: 2}


def test_one_after_another_with_a_concurrency_of_one() -> None:
    sink = MeetingSink(tables=2, patience=0.2)
    pipeline, source = _pipeline(sink, insert_concurrency=1)
    pipeline.step()
    assert sink.tables == [] and source.committed == {}, "alone, an insert never met the other table's"


def test_a_failed_insert_beside_another_leaves_the_other_committed_and_itself_uncommitted() -> None:
    sink = MeetingSink(tables=2, failing="fact_clicks")
    pipeline, source = _pipeline(sink)
    pipeline.step()
    assert sink.tables == ["fact_impressions"]
    assert source.committed == {IMPRESSIONS: 3}
    assert CLICKS in pipeline.paused
