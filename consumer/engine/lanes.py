"""The two lanes a message may take into ClickHouse, behind one small protocol.

* The Python lane (python_lane.py) decodes and maps each message in Python: every table, format
  and op. Poison is found here, and only here, and dead-lettered.
* The ClickHouse lane (clickhouse_lane.py) hands the raw Avro bytes of fact messages to ClickHouse,
  which decodes and maps them itself (consumer/sink/server_plan.py). It takes a message only when
  its writer schema has a plan, and ClickHouse refuses a whole batch it would map differently from
  the Python lane; the engine then offers those messages to the Python lane.

A lane's `offer` takes one message into its partition's batch (False: not this lane, or not now).
Its `flush` writes a group of partitions' batches in one insert, with one of three outcomes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from consumer.engine.batch import BatchPolicy, PartitionBatch
from consumer.engine.partition import PartitionState
from consumer.engine.report import RunReport
from consumer.kafka.source import Partition
from consumer.ops import metrics


@dataclass(frozen=True)
class Applied:
    """ClickHouse holds the group's batches: commit them."""

    partitions: list[Partition]


@dataclass(frozen=True)
class Rejected:
    """ClickHouse refused the insert for its data and wrote nothing: the messages go to the
    Python lane (a group of several is first tried partition by partition)."""

    partitions: list[Partition]
    reason: str


@dataclass(frozen=True)
class Failed:
    """The insert failed: back off and retry. The lane remembers whether it was in doubt."""

    partitions: list[Partition]
    table: str
    error: Exception


FlushOutcome = Applied | Rejected | Failed


class Lane(Protocol):
    def offer(self, state: PartitionState, offset: int, key: bytes | None, value: bytes | None, size: int) -> bool: ...

    def flush(self, partition: Partition) -> FlushOutcome: ...


class Assignment:
    """The partitions a lane may group into one insert: the engine's states and paused set."""

    def __init__(self, partitions: dict[Partition, PartitionState], policy: BatchPolicy, report: RunReport):
        self.partitions = partitions
        self.policy = policy
        self.report = report
        # The report's counts, kept by inserts that run side by side (consumer.engine.pipeline).
        self.counting = threading.Lock()

    def group(self, partition: Partition, joins: Callable[[PartitionBatch], bool], rows: int) -> list[Partition]:
        """This partition and the others whose batches `joins` accepts (not paused, oldest first)
        while the rows and bytes of them all stay within the batch policy."""
        size = self.partitions[partition].batch.bytes
        group = [partition]
        peers = sorted(
            (s.batch.started_at, p)
            for p, s in self.partitions.items()
            if p != partition and not s.paused and joins(s.batch)
        )
        for _, peer in peers:
            other = self.partitions[peer].batch
            more = len(other.rows) + len(other.raw_values)
            if rows + more <= self.policy.max_rows and size + other.bytes <= self.policy.max_bytes:
                group.append(peer)
                rows, size = rows + more, size + other.bytes
        return sorted(group)

    def inserted(self, table: str, started: float, rows: int, commit_ts_ms: Iterable[int]) -> None:
        """Metrics of an insert that returned; latency from the Postgres commit times given
        (consumed only after the insert's end is taken)."""
        finished = time.time()
        metrics.insert_seconds.labels(table).observe(time.perf_counter() - started)
        metrics.rows_inserted.labels(table).inc(rows)
        metrics.batch_rows.labels(table).observe(rows)
        metrics.last_insert_timestamp.set(finished)
        with self.counting:
            self.report.rows_inserted[table] += rows
            self.report.inserts += 1
        latency = metrics.end_to_end_seconds.labels(table)
        for commit_ms in commit_ts_ms:
            latency.observe(max(0.0, finished - commit_ms / 1000))
