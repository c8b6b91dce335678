"""Fakes of the engine's collaborators, shared by the tests: a Kafka source, a ClickHouse sink,
a decoder, a mapper and a dead-letter queue, each with the public interface the engine uses."""

from __future__ import annotations

from consumer.engine.bounds import Bounds
from consumer.engine.pipeline import Pipeline, PipelineConfig
from consumer.sink.clickhouse import AppliedOffsets
from consumer.transform.mapping import Mapper, load_mapping

TOPIC = "adtech.public.impressions"


class FakeMessage:
    """A consumed message, shaped like confluent_kafka.Message."""

    def __init__(self, offset: int, partition: int = 0, topic: str = TOPIC, value: bytes = b"x"):
        self._offset, self._partition, self._topic, self._value = offset, partition, topic, value

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def value(self):
        return self._value

    def key(self):
        return None

    def error(self):
        return None


class FakeSource:
    """A partition log with offsets 0..end-1, where `markers` are transaction markers (never
    delivered, but the position moves past them)."""

    def __init__(self, end: int, markers: set[int] = frozenset(), start: int = 0):
        self.end, self.markers, self.next = end, set(markers), start
        self.commits: list[int] = []
        self.paused = False
        self.assign_cb = None

    def start(self):
        self.assign_cb([(TOPIC, 0)])

    def poll(self, max_messages, timeout):
        out = []
        while self.next < self.end and len(out) < 3 and not self.paused:
            if self.next not in self.markers:
                out.append(FakeMessage(self.next))
            self.next += 1
        return out

    def position(self, partition):
        return self.next

    def commit(self, offsets):
        self.commits.append(offsets[(TOPIC, 0)])
        return True

    def pause(self, partitions):
        self.paused = True

    def resume(self, partitions):
        self.paused = False

    def seek(self, partition, offset):
        self.next = offset

    def close(self):
        pass


class FakeSink:
    def __init__(self, present: list[tuple[int, int]] = ()):
        self.present = present
        self.inserted: list[int] = []
        self.tokens: list[str] = []

    def applied_offsets(self, table, topic):
        return {0: max((hi for _, hi in self.present), default=-1)}

    def applied_in_ranges(self, table, topic, ranges, role="fact"):
        return {0: AppliedOffsets(list(self.present))}

    def insert(self, table, column_names, rows, token, *args, **kwargs):
        index = column_names.index("_offset")
        self.inserted.extend(row[index] for row in rows)
        self.tokens.append(token)

    def missing_columns(self, table):
        return []


class FakeEvent:
    op = "c"
    snapshot = False
    lsn = 1
    commit_ts_ms = 1_800_000_000_000


class FakeDecoder:
    def decode(self, value):
        return FakeEvent()


class DeadLetters:
    """A dead-letter queue that keeps what it is sent."""

    def __init__(self):
        self.sent: list[dict] = []
        self.durable: list[dict] = []  # what a flush made durable

    def send(self, **record) -> None:
        self.sent.append(record)

    def flush(self, timeout: float = 30.0) -> None:
        self.durable = list(self.sent)

    def close(self) -> None:
        pass


class RowsMapper(Mapper):
    """The shipped mapping, with the rows of a change made by `rows(table, event, tiebreak)`."""

    def __init__(self, rows):
        super().__init__(load_mapping())
        self.make_rows = rows

    def rows(self, table, event, tiebreak):
        return self.make_rows(table, event, tiebreak)


def one_null_row(table, event, tiebreak) -> list[tuple]:
    return [tuple(None for _ in table.column_names)]


def fake_pipeline(
    source: FakeSource,
    sink,
    decoder=None,
    rows=one_null_row,
    bounds: Bounds | None = None,
    dlq: DeadLetters | None = None,
    **config,
) -> Pipeline:
    """A Pipeline on the fakes: the source records the assign callback."""

    def factory(on_assign, on_revoke, on_lost):
        source.assign_cb = on_assign
        return source

    return Pipeline(
        source_factory=factory,
        decoder=decoder or FakeDecoder(),
        mapper=RowsMapper(rows),
        sink=sink,
        dlq=dlq or DeadLetters(),
        config=PipelineConfig(poll_timeout_s=0, **config),
        bounds=bounds,
    )
