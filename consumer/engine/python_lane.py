"""The Python lane: decode → map → rows, for every table, format and op.

Where poison is found: a message that cannot be decoded or mapped goes to the dead-letter topic
with its class and reason, and its offset moves on like any other. A message that cannot be
applied *yet* (the registry is unreachable; its table's columns are being added) is not taken:
the engine re-reads it later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from consumer.core.errors import Poison, Transient
from consumer.decode.envelope import EnvelopeDecoder
from consumer.engine.batch import PartitionBatch
from consumer.engine.breaker import PoisonBreaker
from consumer.engine.dlq import DeadLetterQueue
from consumer.engine.lanes import Applied, Assignment, Failed, FlushOutcome
from consumer.engine.partition import PartitionState
from consumer.kafka.source import Partition
from consumer.ops import metrics
from consumer.sink.clickhouse import UnresolvedPrevious
from consumer.sink.refusals import first_line, refused_for_data
from consumer.sink.shards import Shards
from consumer.transform.mapping import Mapper, NewColumns, TableMapping

log = logging.getLogger(__name__)


class PythonLane:
    def __init__(
        self,
        assignment: Assignment,
        decoder: EnvelopeDecoder,
        mapper: Mapper,
        shards: Shards,
        dlq: DeadLetterQueue,
        *,
        evolve: Callable[[NewColumns], TableMapping],
        breaker: PoisonBreaker,
        token_suffix: str = "",
    ):
        self.assignment = assignment
        self.decoder = decoder
        self.mapper = mapper
        self.shards = shards
        self.dlq = dlq
        self.evolve = evolve  # widens a table (flushing its batches first); raises BlockingIOError if it cannot
        self.breaker = breaker
        self.token_suffix = token_suffix

    def offer(self, state: PartitionState, offset: int, key: bytes | None, value: bytes | None, size: int) -> bool:
        """Adds the message's rows to the batch, or dead-letters it. False: not now."""
        partition = state.partition
        try:
            event = self.decoder.decode(value)
            rows = [] if event is None else self._map(state, event, offset)
        except (Transient, BlockingIOError) as exc:
            metrics.registry_retries.inc()
            log.warning("cannot apply %s[%d]@%d yet (%s); pausing the partition", *partition, offset, exc)
            return False
        except Poison as exc:
            return self._poison(state, offset, key, value, exc.error_class, str(exc))
        except Exception as exc:  # a defect meeting input nobody foresaw: this message, not the process
            log.exception("decoding or mapping %s[%d]@%d failed", *partition, offset)
            return self._poison(state, offset, key, value, f"unexpected_{type(exc).__name__}", repr(exc))
        state.message_applied()
        commit_ts_ms = event.commit_ts_ms if event else None
        assertion = event is not None and event.op == "r"
        state.batch.add(offset, rows, size, commit_ts_ms, assertion, source=(key, value))
        return True

    def _poison(self, state: PartitionState, offset: int, key, value, error_class: str, reason: str) -> bool:
        if self.breaker.poison(state.partition[0]):
            log.error("%s: too much poison (%s); the partition waits", state.partition[0], error_class)
            return False
        self.dead_letter(state.partition, offset, key, value, error_class, reason)
        state.batch.skip(offset)
        state.message_applied()
        return True

    def _map(self, state: PartitionState, event, offset: int) -> list[tuple]:
        try:
            return self.mapper.rows(state.batch.table, event, tiebreak=offset)
        except NewColumns as change:
            return self.mapper.rows(self.evolve(change), event, tiebreak=offset)

    def dead_letter(
        self, partition: Partition, offset: int, key: bytes | None, value: bytes | None, error_class: str, reason: str
    ) -> None:
        metrics.dead_lettered.labels(error_class).inc()
        with self.assignment.counting:
            self.assignment.report.dead_lettered += 1
        self.dlq.send(
            source_topic=partition[0],
            partition=partition[1],
            offset=offset,
            key=key,
            value=value,
            error_class=error_class,
            reason=reason,
        )

    def flush(self, partition: Partition) -> FlushOutcome:
        """One insert of the partition's rows; for a dimension table, with the table's other row
        batches on its shard (versioned rows: a row written twice is one row, so any grouping is
        safe)."""
        batch = self.assignment.partitions[partition].batch
        group = [partition]
        if batch.table.role == "dimension":
            shard = self.shards.of(batch.partition)
            group = self.assignment.group(
                partition,
                lambda b: (
                    b.table is batch.table
                    and b.messages > 0
                    and not b.raw_values
                    and self.shards.of(b.partition) == shard
                ),
                len(batch.rows),
            )
        batches = [self.assignment.partitions[p].batch for p in group]
        try:
            try:
                self._insert(batches)
            except Exception as exc:
                if not refused_for_data(exc):
                    raise
                log.warning("ClickHouse refused rows of %s for their data (%s); bisecting", group, first_line(exc))
                for member in batches:
                    self._bisect(member, member.row_offsets())
        except Exception as exc:
            return Failed(group, batch.table.table, exc)
        return Applied(group)

    def _bisect(self, batch: PartitionBatch, offsets: list[int]) -> None:
        """Writes the messages at `offsets` (the batch's first ones) in halves until each one
        ClickHouse refuses stands alone, and dead-letters those. In offset order, and the
        dead-letter topic is flushed before anything after a refused message is written: the
        watermark can then never pass a message that is neither in ClickHouse nor in the DLQ."""
        if not offsets:
            return
        try:
            self._insert([batch.head(offsets[-1])])
        except Exception as exc:
            if not refused_for_data(exc):
                raise
            if len(offsets) > 1:
                middle = len(offsets) // 2
                self._bisect(batch, offsets[:middle])
                self._bisect(batch, offsets[middle:])
                return
            key, value = batch.sources[offsets[0]]
            partition = (batch.topic, batch.partition)
            self.dead_letter(partition, offsets[0], key, value, "clickhouse_refused", first_line(exc))
            self.dlq.flush()
        batch.drop_rows_through(offsets[-1])

    def _insert(self, batches: list[PartitionBatch]) -> None:
        while True:
            try:
                return self._insert_once(batches)
            except UnresolvedPrevious as exc:
                # Rows whose unchanged columns have no previous value anywhere: dead-letter them
                # (with the row) and apply the rest.
                self._dead_letter_unresolved(batches, exc)

    def _insert_once(self, batches: list[PartitionBatch]) -> None:
        rows = [row for batch in batches for row in batch.rows]
        if not rows:
            return
        self.dlq.flush()  # rows past a dead-lettered message only once the DLQ holds it
        first = batches[0]
        assertions: set[int] = set()
        start = 0
        for batch in batches:
            assertions.update(start + i for i in batch.assertions)
            start += len(batch.rows)
        started = time.perf_counter()
        token = ",".join(b.dedup_token for b in batches if b.rows) + self.token_suffix
        partitions = self.assignment.partitions
        latest = {(b.topic, b.partition): partitions[(b.topic, b.partition)].latest for b in batches}
        self.shards.sink(first.partition).insert(first.table, first.column_names, rows, token, assertions, latest)
        commit_times = (ms for batch in batches for ms in batch.commit_ts_ms)
        self.assignment.inserted(first.table.table, started, len(rows), commit_times)

    def _dead_letter_unresolved(self, batches: list[PartitionBatch], exc: UnresolvedPrevious) -> None:
        bad = set(exc.changes)
        for batch in batches:
            offset_index = batch.column_names.index("_offset")
            for row in batch.rows:
                if (batch.partition, row[offset_index]) in bad:
                    partition = (batch.topic, batch.partition)
                    self.dead_letter(
                        partition, row[offset_index], None, repr(row).encode(), "previous_value_unknown", str(exc)
                    )
            batch.rows = [row for row in batch.rows if (batch.partition, row[offset_index]) not in bad]
