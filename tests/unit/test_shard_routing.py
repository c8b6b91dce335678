"""Routing to ClickHouse shards and shard-scoped backoff, on the engine with fakes: each Kafka
partition's rows go to one shard (partition % shards), and a shard that fails holds back only
its own partitions while the others keep flowing; when it returns, nothing is lost or doubled."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from consumer.engine.batch import BatchPolicy
from consumer.engine.partition import Phase
from consumer.settings import ConfigError, load_settings
from consumer.sink.shards import Shards
from tests.fakes import TOPIC, FakeMessage, FakeSink, fake_pipeline

PARTITIONS = 4
END = 30  # offsets 0..29 in every partition


class PartitionedSource:
    """Offsets 0..end-1 in each of `partitions` partitions of one topic; pause and resume per partition."""

    def __init__(self, partitions: int, end: int):
        self.end = end
        self.next = dict.fromkeys(range(partitions), 0)
        self.paused: set[int] = set()
        self.committed: dict[int, int] = {}
        self.assign_cb = None

    def start(self):
        self.assign_cb([(TOPIC, p) for p in self.next])

    def poll(self, max_messages, timeout):
        out = []
        for p in self.next:
            while self.next[p] < self.end and p not in self.paused and len(out) < max_messages:
                out.append(FakeMessage(self.next[p], partition=p))
                self.next[p] += 1
        return out

    def position(self, partition):
        return self.next[partition[1]]

    def commit(self, offsets):
        self.committed.update({p: o for (_, p), o in offsets.items()})
        return True

    def pause(self, partitions):
        self.paused.update(p for _, p in partitions)

    def resume(self, partitions):
        self.paused.difference_update(p for _, p in partitions)

    def seek(self, partition, offset):
        self.next[partition[1]] = offset

    def close(self):
        pass


class ShardSink(FakeSink):
    """One shard: keeps (partition, offset) of every row; `down` makes inserts fail."""

    def __init__(self):
        super().__init__()
        self.down = False
        self.pings = 0
        self.rows: list[tuple[int, int]] = []

    def applied_offsets(self, table, topic):
        if self.down:
            raise ConnectionError("shard unreachable")
        return {}

    def answers(self, timeout_s):
        self.pings += 1
        return not self.down

    def insert(self, table, column_names, rows, token, *args, **kwargs):
        if self.down:
            raise ConnectionError("shard unreachable")
        at, partition = column_names.index("_offset"), column_names.index("_partition")
        self.rows.extend((row[partition], row[at]) for row in rows)


def coordinates(table, event, tiebreak) -> list[tuple]:
    """A row carrying its partition and offset (the engine's batches set no columns themselves)."""
    row = dict.fromkeys(table.column_names)
    row["_offset"], row["_partition"] = tiebreak, coordinates.partition
    return [tuple(row[c] for c in table.column_names)]


def run_until_quiet(pipeline, source, steps: int = 30) -> None:
    for _ in range(steps):
        pipeline.step()


def shard_up(shard: str) -> float | None:
    return REGISTRY.get_sample_value("cdc_clickhouse_shard_up", {"shard": shard})


def test_partition_goes_to_partition_mod_shards() -> None:
    shards = Shards([ShardSink(), ShardSink(), ShardSink()])
    assert [shards.of(p) for p in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert shards.sink(4) is shards.sinks[1]
    assert [Shards.label(s) for s in range(3)] == ["1", "2", "3"]


def make_pipeline():
    source = PartitionedSource(PARTITIONS, END)
    sinks = [ShardSink(), ShardSink()]

    def rows(table, event, tiebreak):
        return coordinates(table, event, tiebreak)

    pipeline = fake_pipeline(
        source,
        Shards(sinks),
        rows=rows,
        batch=BatchPolicy(min_insert_interval_s=0),  # every step may insert
        # A backoff that never ends within a test: a partition held back by the failing shard would
        # stay paused, so the other shard's progress shows it was never held.
        retry_base_s=3600,
        retry_max_s=3600,
    )
    original_offer = pipeline._offer_python

    def offer_with_partition(state, offset, key, value, size):
        coordinates.partition = state.partition[1]
        return original_offer(state, offset, key, value, size)

    pipeline._offer_python = offer_with_partition
    return pipeline, source, sinks


def test_each_partition_is_written_to_its_shard_only() -> None:
    pipeline, source, sinks = make_pipeline()
    source.start()
    run_until_quiet(pipeline, source)
    for shard, sink in enumerate(sinks):
        assert {p for p, _ in sink.rows} == {p for p in range(PARTITIONS) if p % 2 == shard}
        assert sorted(sink.rows) == [(p, o) for p in range(PARTITIONS) if p % 2 == shard for o in range(END)]
    assert {p: pipeline.partitions[(TOPIC, p)].shard for p in range(PARTITIONS)} == {0: 0, 1: 1, 2: 0, 3: 1}


def test_a_failing_shard_holds_back_only_its_partitions() -> None:
    pipeline, source, sinks = make_pipeline()
    sinks[1].down = True
    source.start()
    run_until_quiet(pipeline, source)
    # Shard 1 (partitions 0 and 2) took everything; shard 2's partitions back off.
    assert sorted(sinks[0].rows) == [(p, o) for p in (0, 2) for o in range(END)]
    assert sinks[1].rows == []
    assert source.committed.get(0) == END and source.committed.get(2) == END
    assert 1 not in source.committed and 3 not in source.committed
    phases = {p: pipeline.partitions[(TOPIC, p)].phase for p in range(PARTITIONS)}
    assert phases[0] is Phase.ACTIVE and phases[2] is Phase.ACTIVE
    assert {phases[1], phases[3]} <= {Phase.BACKING_OFF, Phase.RECOVERING}
    assert not pipeline.ready
    assert pipeline.shards_down == ["2"]
    assert shard_up("2") == 0 and shard_up("1") == 1

    sinks[1].down = False
    for state in pipeline.partitions.values():
        state.retry_at = 0  # the backoff elapsed
    run_until_quiet(pipeline, source)
    # Back: every offset of its partitions exactly once, committed to the end.
    assert sorted(sinks[1].rows) == [(p, o) for p in (1, 3) for o in range(END)]
    assert sorted(sinks[0].rows) == [(p, o) for p in (0, 2) for o in range(END)]
    assert source.committed == dict.fromkeys(range(PARTITIONS), END)
    assert pipeline.ready and pipeline.shards_down == []
    assert shard_up("2") == 1
    # Once down, shard 2 was pinged before it was tried again; shard 1, never down, was not.
    assert sinks[1].pings > 0 and sinks[0].pings == 0


def test_partitions_assigned_while_their_shard_is_down_wait_for_its_watermark() -> None:
    """A rebalance (or a start) while a shard does not answer: its partitions are assigned all
    the same and wait; the other shard's partitions flow; once it answers, everything once."""
    pipeline, source, sinks = make_pipeline()
    sinks[1].down = True
    source.start()
    run_until_quiet(pipeline, source)
    assert sorted(sinks[0].rows) == [(p, o) for p in (0, 2) for o in range(END)]
    assert sinks[1].rows == [] and 1 not in source.committed and 3 not in source.committed
    assert not pipeline.partitions[(TOPIC, 1)].watermark_known and pipeline.shards_down == ["2"]
    assert not pipeline.ready

    sinks[1].down = False
    for state in pipeline.partitions.values():
        state.retry_at = 0  # the backoff elapsed
    run_until_quiet(pipeline, source)
    assert sorted(sinks[1].rows) == [(p, o) for p in (1, 3) for o in range(END)]
    assert source.committed == dict.fromkeys(range(PARTITIONS), END)
    assert pipeline.ready and pipeline.shards_down == []


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"clickhouse_cluster": "cdc"}, "go together"),
        ({"clickhouse_shard_urls": "http://a:8123,http://b:8123"}, "go together"),
        ({"clickhouse_cluster": "cdc; DROP", "clickhouse_shard_urls": "http://a:8123"}, "plain identifier"),
        ({"clickhouse_replicated": True}, "needs CDC_CLICKHOUSE_CLUSTER"),
    ],
)
def test_cluster_settings_fail_fast(settings: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(**settings)


def test_shard_urls_in_order() -> None:
    settings = load_settings(clickhouse_cluster="cdc", clickhouse_shard_urls=" http://a:8123/db , http://b:8123/db ")
    assert settings.shard_urls == ["http://a:8123/db", "http://b:8123/db"]
