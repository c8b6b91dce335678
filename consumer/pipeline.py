"""The consumer loop: source → decode → map → batch → sink → commit.

Exactly-once effect without an extra store: every row carries the Kafka offset of the change
that produced it, so ClickHouse itself knows, per partition, the highest offset it holds (the
applied watermark). On assignment the pipeline reads that watermark and skips what is at or
below it. A crash between insert and commit, a rebalance, an offset reset or a replay all
re-deliver messages the watermark already covers: they are skipped, never counted twice.
Offsets are committed only after the insert returned, so nothing is lost either.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Literal

from confluent_kafka import Message

from consumer import metrics
from consumer.batch import BatchPolicy, PartitionBatch
from consumer.decode import DecodeError, EnvelopeDecoder, RegistryUnavailable
from consumer.dlq import DeadLetterQueue
from consumer.mapping import Mapper, Mapping, MappingError, NewColumns, TableMapping
from consumer.sink import AppliedOffsets, ClickHouseSink, UnresolvedPrevious
from consumer.source import KafkaSource, Partition

log = logging.getLogger(__name__)

# Fault injection for the crash tests: SIGKILL this process right after the Nth successful
# insert, before its offsets are committed (the moment a crash is most likely to double-count).
KILL_AFTER_INSERTS = int(os.environ.get("CDC_FAULT_KILL_AFTER_INSERTS", "0"))


@dataclass
class PartitionState:
    batch: PartitionBatch
    watermark: int  # highest offset whose rows ClickHouse holds; -1 when none
    retry_at: float = 0.0
    failures: int = 0
    committed: int = -1
    # Bounded runs (replay): offsets inside the range whose rows ClickHouse already holds.
    applied: AppliedOffsets = field(default_factory=AppliedOffsets)


@dataclass
class PipelineConfig:
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    poll_messages: int = 10_000
    poll_timeout_s: float = 0.2
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    truncate_action: Literal["dlq", "skip"] = "dlq"


class Pipeline:
    def __init__(
        self,
        *,
        source_factory,
        decoder: EnvelopeDecoder,
        mapping: Mapping,
        sink: ClickHouseSink,
        dlq: DeadLetterQueue,
        config: PipelineConfig | None = None,
        bounds: dict[Partition, range] | None = None,
    ):
        self.decoder = decoder
        self.mapping = mapping
        self.sink = sink
        self.dlq = dlq
        self.config = config or PipelineConfig()
        self.mapper = Mapper(mapping, self.config.truncate_action)
        self.partitions: dict[Partition, PartitionState] = {}
        self.paused: set[Partition] = set()
        self.inserts = 0
        self.stopping = False
        # A bounded run (`cdc-consumer replay`) applies only offsets in bounds[partition], never
        # commits past a bound, and stops once every bounded partition committed its bound.
        # Partitions without a bound are not read at all. None: the unbounded service.
        self.bounds = bounds
        self.finished: set[Partition] = set()
        self.token_suffix = ""  # replays insert with dedup tokens of their own (see replay.py)
        self.on_step = None  # called after every step (replay's progress bar)
        self.last_step = time.monotonic()  # for the liveness probe
        self.source: KafkaSource = source_factory(self._assigned, self._revoked, self._lost)

    # -- rebalances -------------------------------------------------------------------------
    def _assigned(self, partitions: list[Partition]) -> None:
        metrics.rebalances.labels("assign").inc()
        for topic in {t for t, _ in partitions}:
            table = self.mapping.for_topic(topic)
            missing = self.sink.missing_columns(table)
            if missing:
                self.sink.add_columns(table.table, missing)
            if self.bounds is not None:
                self._assigned_bounded(table, topic, [p for t, p in partitions if t == topic])
                continue
            applied = self.sink.applied_offsets(table.table, topic)
            for t, p in partitions:
                if t == topic:
                    self.partitions[(t, p)] = PartitionState(PartitionBatch(table, t, p), applied.get(p, -1))
        log.info("assigned %s", sorted(partitions))
        metrics.assigned_partitions.set(len(self.partitions))

    def _assigned_bounded(self, table, topic: str, partitions: list[int]) -> None:
        """A replay may run beside the live consumer, whose rows lie above the range: so instead of
        the watermark it asks which offsets *inside* its range ClickHouse holds, and skips those."""
        assert self.bounds is not None
        ranges = {p: self.bounds[(topic, p)] for p in partitions if (topic, p) in self.bounds}
        present = self.sink.applied_in_ranges(table.table, topic, ranges)
        for p in partitions:
            state = PartitionState(PartitionBatch(table, topic, p), -1, applied=present.get(p, AppliedOffsets()))
            self.partitions[(topic, p)] = state
            if p in ranges and len(ranges[p]) == 0:
                self.finished.add((topic, p))

    def _bounded(self, partition: Partition, offset: int) -> int | None:
        """The offset to commit: never past the partition's bound; None: commit nothing."""
        if self.bounds is None:
            return offset
        bound = self.bounds.get(partition)
        return None if bound is None else min(offset, bound.stop)

    def _committed(self, partition: Partition, state: PartitionState, offset: int) -> None:
        state.committed = offset
        if self.bounds is not None and partition in self.bounds and offset >= self.bounds[partition].stop:
            self.finished.add(partition)

    @property
    def done(self) -> bool:
        """A bounded run whose every partition reached its bound."""
        return self.bounds is not None and all(p in self.finished for p in self.bounds)

    def _revoked(self, partitions: list[Partition]) -> None:
        metrics.rebalances.labels("revoke").inc()
        for partition in partitions:
            if partition in self.partitions:
                # Best effort: what cannot be flushed now is re-read by the next owner, and
                # the watermark makes that safe.
                self._flush(partition, final=True)
                self.partitions.pop(partition, None)
            self.paused.discard(partition)
        log.info("revoked %s", sorted(partitions))
        metrics.assigned_partitions.set(len(self.partitions))
        metrics.paused_partitions.set(len(self.paused))

    def _lost(self, partitions: list[Partition]) -> None:
        """The group took these partitions without a clean handover: nothing may be committed
        for them; their uncommitted rows are covered by the watermark when re-read."""
        metrics.rebalances.labels("lost").inc()
        for partition in partitions:
            self.partitions.pop(partition, None)
            self.paused.discard(partition)
        log.warning("lost %s", sorted(partitions))
        metrics.assigned_partitions.set(len(self.partitions))
        metrics.paused_partitions.set(len(self.paused))

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.source.start()
        try:
            while not self.stopping and not self.done:
                self.step()
                if self.on_step is not None:
                    self.on_step()
            for partition in list(self.partitions):
                self._flush(partition, final=True)
        finally:
            self.source.close()
            self.dlq.close()

    def _stop(self, *_args) -> None:
        log.info("stopping: finishing the batches in flight")
        self.stopping = True

    def step(self) -> None:
        self.last_step = time.monotonic()
        messages = self.source.poll(self.config.poll_messages, self.config.poll_timeout_s)
        blocked: set[Partition] = set()
        for message in messages:
            partition = (message.topic(), message.partition())
            if partition in blocked or partition not in self.partitions:
                continue
            if not self._handle(partition, message):
                blocked.add(partition)
        now = time.monotonic()
        for partition, state in list(self.partitions.items()):
            if partition in self.paused and now >= state.retry_at:
                self._resume(partition)
            if partition not in self.paused and state.batch.ready(self.config.batch, now):
                self._flush(partition)
            elif state.batch.messages == 0:
                self._commit_position(partition, state)

    def _commit_position(self, partition: Partition, state: PartitionState) -> None:
        """An idle partition whose position moved past a transaction marker commits it."""
        position = self.source.position(partition)
        if position is not None:
            position = self._bounded(partition, position)
        if position is not None and position > state.committed and self.source.commit({partition: position}):
            self._committed(partition, state, position)

    def _handle(self, partition: Partition, message: Message) -> bool:
        """Adds one message to its partition's batch. False: stop reading this partition for now."""
        state = self.partitions[partition]
        offset = message.offset()
        value = message.value()
        size = len(value) if value else 0
        metrics.messages_consumed.labels(*map(str, partition)).inc()
        metrics.bytes_consumed.labels(*map(str, partition)).inc(size)
        if self.bounds is not None:
            bound = self.bounds.get(partition)
            if bound is None or offset >= bound.stop:
                # Past the replay's bound: left for the live group (not committed); stop fetching.
                self.source.pause([partition])
                return False
            if offset < bound.start:
                state.batch.skip(offset)
                return True
        if offset <= state.watermark or offset in state.applied:
            metrics.messages_skipped.labels(partition[0]).inc()
            state.batch.skip(offset)
            return True
        try:
            event = self.decoder.decode(value)
            rows = [] if event is None else self._map(state, event, offset)
        except (RegistryUnavailable, BlockingIOError) as exc:
            metrics.registry_retries.inc()
            log.warning("cannot apply %s[%d]@%d yet (%s); pausing the partition", *partition, offset, exc)
            self.source.seek(partition, offset)
            self._pause(partition, state)
            return False
        except (DecodeError, MappingError) as exc:
            metrics.dead_lettered.labels(exc.error_class).inc()
            self.dlq.send(
                source_topic=partition[0],
                partition=partition[1],
                offset=offset,
                key=message.key(),
                value=value,
                error_class=exc.error_class,
                reason=str(exc),
            )
            state.batch.skip(offset)
            return True
        state.batch.add(offset, rows, size, event.commit_ts_ms if event else None)
        return True

    def _map(self, state: PartitionState, event, offset: int) -> list[tuple]:
        try:
            return self.mapper.rows(state.batch.table, event, tiebreak=offset)
        except NewColumns as change:
            self._evolve(change)
            return self.mapper.rows(self._table_mapping(change.table.table), event, tiebreak=offset)

    def _table_mapping(self, table: str) -> TableMapping:
        return next(t for t in self.mapping.tables if t.table == table)

    def _evolve(self, change: NewColumns) -> None:
        """The source table gained columns: flush every batch of the old shape, add the columns
        in ClickHouse, and carry on with the wider mapping — no restart."""
        name = change.table.table
        for partition, state in self.partitions.items():
            if state.batch.table.table == name and not self._flush(partition):
                raise BlockingIOError(f"{name}: batches must be written before its columns change")
        self.sink.add_columns(name, [(c.name, c.clickhouse_type) for c in change.columns])
        widened = change.table.with_columns(change.columns)
        self.mapping = self.mapping.replaced(widened)
        self.mapper.mapping = self.mapping
        for state in self.partitions.values():
            if state.batch.table.table == name:
                state.batch = PartitionBatch(widened, state.batch.topic, state.batch.partition)

    def _flush(self, partition: Partition, final: bool = False) -> bool:
        state = self.partitions[partition]
        batch = state.batch
        if batch.messages == 0:
            return True
        try:
            if batch.rows:
                self._insert(batch)
        except UnresolvedPrevious as exc:
            # Rows whose unchanged columns have no previous value anywhere: dead-letter them
            # (with the row) and apply the rest.
            self._dead_letter_unresolved(batch, exc)
            return self._flush(partition, final)
        except Exception as exc:
            metrics.insert_retries.labels(batch.table.table).inc()
            state.failures += 1
            delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (state.failures - 1))
            log.error(
                "insert into %s failed (%s: %s); retry in %.1fs, partitions paused",
                batch.table.table,
                type(exc).__name__,
                exc,
                delay,
            )
            if not final:
                state.retry_at = time.monotonic() + delay
                for other, other_state in self.partitions.items():
                    other_state.retry_at = max(other_state.retry_at, state.retry_at)
                    self._pause(other, other_state)
            return False
        if KILL_AFTER_INSERTS and self.inserts == KILL_AFTER_INSERTS:
            os.kill(os.getpid(), signal.SIGKILL)
        self.dlq.flush()
        started = time.perf_counter()
        # The position is past any transaction marker after the last record, so a caught-up
        # group shows a lag of 0 rather than 1 per transaction-ending partition.
        next_offset = self._bounded(partition, max(batch.last_offset + 1, self.source.position(partition) or 0))
        if next_offset is not None and self.source.commit({partition: next_offset}):
            self._committed(partition, state, next_offset)
        metrics.commit_seconds.observe(time.perf_counter() - started)
        state.failures = 0
        if batch.last_row_offset is not None:
            state.watermark = max(state.watermark, batch.last_row_offset)
        state.batch = PartitionBatch(batch.table, batch.topic, batch.partition)
        return True

    def _insert(self, batch: PartitionBatch) -> None:
        table = batch.table.table
        started = time.perf_counter()
        self.sink.insert(batch.table, batch.column_names, batch.rows, batch.dedup_token + self.token_suffix)
        finished = time.time()
        metrics.insert_seconds.labels(table).observe(time.perf_counter() - started)
        metrics.rows_inserted.labels(table).inc(len(batch.rows))
        metrics.batch_rows.labels(table).observe(len(batch.rows))
        metrics.last_insert_timestamp.set(finished)
        latency = metrics.end_to_end_seconds.labels(table)
        for commit_ms in batch.commit_ts_ms:
            latency.observe(max(0.0, finished - commit_ms / 1000))
        self.inserts += 1

    def _dead_letter_unresolved(self, batch: PartitionBatch, exc: UnresolvedPrevious) -> None:
        offset_index = batch.column_names.index("_offset")
        bad = set(exc.offsets)
        for row in batch.rows:
            if row[offset_index] in bad:
                metrics.dead_lettered.labels("previous_value_unknown").inc()
                self.dlq.send(
                    source_topic=batch.topic,
                    partition=batch.partition,
                    offset=row[offset_index],
                    key=None,
                    value=repr(row).encode(),
                    error_class="previous_value_unknown",
                    reason=str(exc),
                )
        batch.rows = [row for row in batch.rows if row[offset_index] not in bad]

    def _pause(self, partition: Partition, state: PartitionState) -> None:
        if partition not in self.paused:
            self.source.pause([partition])
            self.paused.add(partition)
            metrics.paused_partitions.set(len(self.paused))
        state.retry_at = max(state.retry_at, time.monotonic() + self.config.retry_base_s)

    def _resume(self, partition: Partition) -> None:
        self.source.resume([partition])
        self.paused.discard(partition)
        metrics.paused_partitions.set(len(self.paused))

    @property
    def ready(self) -> bool:
        """For the readiness probe: false while partitions are held back by errors."""
        return not self.paused
