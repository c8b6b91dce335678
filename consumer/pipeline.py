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
from consumer.server_decode import Rejected, ServerDecoder, for_sink, server_fallbacks
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
    # Held back by a registry outage (or a schema change waiting for ClickHouse) until a message of
    # this partition goes through: for readiness, which a pause alone does not show, since every
    # retry resumes the partition until its message fails again.
    blocked: bool = False
    # Bounded runs (replay): offsets inside the range whose rows ClickHouse already holds.
    applied: AppliedOffsets = field(default_factory=AppliedOffsets)
    # Counted per message, handed to Prometheus once per step (a labelled inc costs ~1 µs).
    consumed: int = 0
    consumed_bytes: int = 0
    # The fast lane (consumer.server_decode): the plan for the last header seen, and after a
    # batch ClickHouse refused, the offset from which to try it again.
    fast_header: bytes = b""
    fast_plan: object = None
    fast_table: object = None  # the table mapping fast_plan was made for
    fast_after: int = 0
    fast_penalty: int = 0


@dataclass
class PipelineConfig:
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    poll_messages: int = 10_000
    poll_timeout_s: float = 0.2
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    truncate_action: Literal["dlq", "skip"] = "dlq"
    # Fact batches decoded and mapped by ClickHouse itself (consumer/server_decode.py).
    server_decode: bool = True


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
        # The fast lane, for the live service only (a bounded replay decodes in Python).
        self.server: ServerDecoder | None = (
            for_sink(sink, decoder) if self.config.server_decode and bounds is None else None
        )
        self._replaying = False
        self.last_step = time.monotonic()  # for the liveness probe
        self._mid_poll = False  # while step() hands the messages of one poll to their batches
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
        self._mid_poll = True
        try:
            for message in messages:
                partition = (message.topic(), message.partition())
                if partition in blocked or partition not in self.partitions:
                    continue
                if not self._handle(partition, message):
                    blocked.add(partition)
        finally:
            self._mid_poll = False
        now = time.monotonic()
        for partition, state in list(self.partitions.items()):
            if state.consumed:
                labels = (partition[0], str(partition[1]))
                metrics.messages_consumed.labels(*labels).inc(state.consumed)
                metrics.bytes_consumed.labels(*labels).inc(state.consumed_bytes)
                state.consumed = state.consumed_bytes = 0
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
        state.consumed += 1
        state.consumed_bytes += size
        if self.bounds is not None:
            bound = self.bounds.get(partition)
            if bound is None or offset >= bound.stop:
                # Past the replay's bound: left for the live group (not committed); stop fetching.
                self.source.pause([partition])
                return False
            if offset < bound.start:
                state.batch.skip(offset)
                return True
        if offset <= state.watermark or (state.applied and offset in state.applied):
            metrics.messages_skipped.labels(partition[0]).inc()
            state.batch.skip(offset)
            return True
        fast_lane = state.batch.raw_values or (self.server is not None and not state.batch.rows)
        if fast_lane and self._fast(partition, state, message, offset, value, size):
            return True
        try:
            event = self.decoder.decode(value)
            rows = [] if event is None else self._map(state, event, offset)
        except (RegistryUnavailable, BlockingIOError) as exc:
            metrics.registry_retries.inc()
            log.warning("cannot apply %s[%d]@%d yet (%s); pausing the partition", *partition, offset, exc)
            self.source.seek(partition, offset)
            self._pause(partition, state)
            state.blocked = True
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
            state.blocked = False
            return True
        state.blocked = False
        state.batch.add(
            offset, rows, size, event.commit_ts_ms if event else None, assertion=event is not None and event.op == "r"
        )
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
            if batch.raw_values and not self._insert_raw(partition, state):
                batch = state.batch  # ClickHouse refused it: decoded in Python instead
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
        # group shows a lag of 0 rather than 1 per transaction-ending partition. Not mid-poll (a
        # schema change flushing the table's batches): the position is then also past messages of
        # this poll that no batch holds yet, and committing it would lose them in a crash.
        position = None if self._mid_poll or self._replaying else self.source.position(partition)
        next_offset = self._bounded(partition, max(batch.last_offset + 1, position or 0))
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
        self.sink.insert(
            batch.table, batch.column_names, batch.rows, batch.dedup_token + self.token_suffix, batch.assertions
        )
        finished = time.time()
        metrics.insert_seconds.labels(table).observe(time.perf_counter() - started)
        metrics.rows_inserted.labels(table).inc(len(batch.rows))
        metrics.batch_rows.labels(table).observe(len(batch.rows))
        metrics.last_insert_timestamp.set(finished)
        latency = metrics.end_to_end_seconds.labels(table)
        for commit_ms in batch.commit_ts_ms:
            latency.observe(max(0.0, finished - commit_ms / 1000))
        self.inserts += 1

    # -- the fast lane: ClickHouse decodes (consumer/server_decode.py) ------------------------
    def _fast(self, partition: Partition, state: PartitionState, message, offset: int, value, size: int) -> bool:
        """Adds the message to a batch ClickHouse will decode, if it can. False: the caller
        applies it in Python (after the batch's raw messages were turned into rows)."""
        batch = state.batch
        if value is None and batch.raw_values:
            batch.skip(offset)  # a tombstone: no rows
            return True
        if value and not self._replaying and offset >= state.fast_after and self.server is not None:
            if state.fast_table is batch.table and value.startswith(state.fast_header):
                plan = state.fast_plan
            else:
                plan = self.server.plan(batch.table, bytes(value[:5]))
                if plan is not None:
                    state.fast_header, state.fast_plan, state.fast_table = plan.header, plan, batch.table
            if plan is not None and (batch.plan is None or batch.plan is plan):
                batch.add_raw(offset, value, size, plan)
                batch.raw_keys.append(message.key())
                return True
        if batch.raw_values:
            self._demote(partition, state)
        return False

    def _demote(self, partition: Partition, state: PartitionState) -> None:
        """Turn the batch's raw messages into rows, in Python, as if they had never taken the
        fast lane (so poison among them is dead-lettered exactly as without it)."""
        old = state.batch
        keys = old.raw_keys
        offsets, values = old.take_raw()
        state.batch = PartitionBatch(old.table, old.topic, old.partition)
        replayed = replayed_bytes = 0
        complete = True
        self._replaying = True
        try:
            for offset, key, value in zip(offsets, keys, values, strict=True):
                replayed += 1
                replayed_bytes += len(value)
                if not self._handle(partition, _Replayed(partition, offset, key, value)):
                    complete = False  # paused and seeked back to `offset`: the rest comes again
                    break
        finally:
            self._replaying = False
            state.consumed -= replayed
            state.consumed_bytes -= replayed_bytes
        if complete:
            # Counters include the skipped messages (tombstones) between the raw ones.
            new = state.batch
            new.messages, new.last_offset, new.bytes = old.messages, old.last_offset, old.bytes
            new.started_at = old.started_at

    def _insert_raw(self, partition: Partition, state: PartitionState) -> bool:
        """One insert of the raw batch. False: ClickHouse refused it and wrote nothing; the batch
        now holds the rows the Python path made of it."""
        batch = state.batch
        table = batch.table.table
        assert self.server is not None
        started = time.perf_counter()
        try:
            self.server.insert(
                batch.plan,
                batch.partition,
                batch.raw_offsets,
                batch.raw_values,
                batch.raw_dedup_token + self.token_suffix,
            )
        except Rejected as exc:
            applied = self.sink.applied_offsets(table, batch.topic).get(batch.partition, -1)
            if applied > state.watermark:
                # Rows of this batch did reach ClickHouse (a view failed after the facts were
                # written): only the same insert again, deduplicated, may complete it.
                raise
            log.warning("%s[%d]: ClickHouse refused the batch (%s); applying it in Python", *partition, exc)
            server_fallbacks.labels(table).inc()
            state.fast_after = batch.last_offset + 1 + state.fast_penalty
            state.fast_penalty = min(max(1_000, 2 * state.fast_penalty), 1_000_000)
            self._demote(partition, state)
            return False
        finished = time.time()
        state.fast_penalty = 0
        changes = len(batch.raw_values)
        metrics.insert_seconds.labels(table).observe(time.perf_counter() - started)
        metrics.rows_inserted.labels(table).inc(changes)
        metrics.batch_rows.labels(table).observe(changes)
        metrics.last_insert_timestamp.set(finished)
        # Latency: the commit times of up to LATENCY_SAMPLES changes, evenly spread (decoding
        # all of them in Python is what the fast lane avoids).
        latency = metrics.end_to_end_seconds.labels(table)
        for value in batch.raw_values[:: max(1, changes // LATENCY_SAMPLES)]:
            try:
                event = self.decoder.decode(value)
            except Exception:  # ClickHouse took it; Python's opinion only matters for the metric
                continue
            if event is not None and event.commit_ts_ms is not None:
                latency.observe(max(0.0, finished - event.commit_ts_ms / 1000))
        self.inserts += 1
        return True

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
        """For the readiness probe: false while partitions are held back by errors (also between
        two retries, while a partition is resumed to try again)."""
        return not self.paused and not any(s.blocked or s.failures for s in list(self.partitions.values()))


LATENCY_SAMPLES = 256


class _Replayed:
    """A message of a demoted batch, shaped like confluent_kafka.Message for `_handle`."""

    __slots__ = ("_key", "_offset", "_partition", "_value")

    def __init__(self, partition: Partition, offset: int, key: bytes | None, value: bytes | None):
        self._partition, self._offset, self._key, self._value = partition, offset, key, value

    def topic(self) -> str:
        return self._partition[0]

    def partition(self) -> int:
        return self._partition[1]

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> None:
        return None
