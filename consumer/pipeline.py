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

from confluent_kafka import Message

from consumer import metrics
from consumer.batch import BatchPolicy, PartitionBatch
from consumer.decode import DecodeError, EnvelopeDecoder, RegistryUnavailable
from consumer.dlq import DeadLetterQueue
from consumer.mapping import Mapper, Mapping, MappingError
from consumer.sink import ClickHouseSink, UnresolvedPrevious
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


@dataclass
class PipelineConfig:
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    poll_messages: int = 10_000
    poll_timeout_s: float = 0.2
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0


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
    ):
        self.decoder = decoder
        self.mapping = mapping
        self.mapper = Mapper(mapping)
        self.sink = sink
        self.dlq = dlq
        self.config = config or PipelineConfig()
        self.partitions: dict[Partition, PartitionState] = {}
        self.paused: set[Partition] = set()
        self.inserts = 0
        self.stopping = False
        self.source: KafkaSource = source_factory(self._assigned, self._revoked, self._lost)

    # -- rebalances -------------------------------------------------------------------------
    def _assigned(self, partitions: list[Partition]) -> None:
        metrics.rebalances.labels("assign").inc()
        for topic in {t for t, _ in partitions}:
            table = self.mapping.for_topic(topic)
            applied = self.sink.applied_offsets(table.table, topic)
            for t, p in partitions:
                if t == topic:
                    self.partitions[(t, p)] = PartitionState(PartitionBatch(table, t, p), applied.get(p, -1))
        log.info("assigned %s", sorted(partitions))
        metrics.assigned_partitions.set(len(self.partitions))

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
            while not self.stopping:
                self.step()
            for partition in list(self.partitions):
                self._flush(partition, final=True)
        finally:
            self.source.close()
            self.dlq.close()

    def _stop(self, *_args) -> None:
        log.info("stopping: finishing the batches in flight")
        self.stopping = True

    def step(self) -> None:
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
        if position is not None and position > state.committed and self.source.commit({partition: position}):
            state.committed = position

    def _handle(self, partition: Partition, message: Message) -> bool:
        """Adds one message to its partition's batch. False: stop reading this partition for now."""
        state = self.partitions[partition]
        offset = message.offset()
        value = message.value()
        size = len(value) if value else 0
        metrics.messages_consumed.labels(*map(str, partition)).inc()
        metrics.bytes_consumed.labels(*map(str, partition)).inc(size)
        if offset <= state.watermark:
            metrics.messages_skipped.labels(partition[0]).inc()
            state.batch.skip(offset)
            return True
        try:
            event = self.decoder.decode(value)
            rows = [] if event is None else self.mapper.rows(state.batch.table, event, tiebreak=offset)
        except RegistryUnavailable as exc:
            metrics.registry_retries.inc()
            log.warning("schema registry unavailable (%s); pausing %s[%d]", exc, *partition)
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
        next_offset = max(batch.last_offset + 1, self.source.position(partition) or 0)
        if self.source.commit({partition: next_offset}):
            state.committed = next_offset
        metrics.commit_seconds.observe(time.perf_counter() - started)
        state.failures = 0
        if batch.last_row_offset is not None:
            state.watermark = max(state.watermark, batch.last_row_offset)
        state.batch = PartitionBatch(batch.table, batch.topic, batch.partition)
        return True

    def _insert(self, batch: PartitionBatch) -> None:
        table = batch.table.table
        started = time.perf_counter()
        self.sink.insert(batch.table, batch.column_names, batch.rows, batch.dedup_token)
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
