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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from confluent_kafka import Message

from consumer.core.errors import DecodeError, MappingError, RegistryUnavailable
from consumer.decode.envelope import EnvelopeDecoder
from consumer.engine.batch import BatchPolicy, PartitionBatch
from consumer.engine.dlq import DeadLetterQueue
from consumer.kafka.source import KafkaSource, Partition
from consumer.ops import metrics
from consumer.sink.clickhouse import AppliedOffsets, ClickHouseSink, LatestRows, UnresolvedPrevious
from consumer.sink.server_plan import Rejected, ServerDecoder, for_sink, server_fallbacks
from consumer.transform.mapping import Mapper, Mapping, NewColumns, TableMapping

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
    applied: AppliedOffsets | None = None
    # Counted per message, handed to Prometheus once per step (a labelled inc costs ~1 µs).
    consumed: int = 0
    consumed_bytes: int = 0
    # The fast lane (consumer.sink.server_plan): the plan for the last header seen, and after a
    # batch ClickHouse refused, the offset from which to try it again.
    fast_header: bytes = b""
    fast_plan: object = None
    fast_table: object = None  # the table mapping fast_plan was made for
    fast_after: int = 0
    fast_penalty: int = 0
    latest: LatestRows | None = None  # dimension partitions: the rows last applied, by key


@dataclass
class PipelineConfig:
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    poll_messages: int = 10_000
    poll_timeout_s: float = 0.2
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    truncate_action: Literal["dlq", "skip"] = "dlq"
    # Fact batches decoded and mapped by ClickHouse itself (consumer/sink/server_plan.py).
    server_decode: bool = True
    latest_rows_kept: int = 10_000  # per dimension partition (consumer.sink.clickhouse.LatestRows)
    latest_rows_max_bytes: int = 32 * 2**20  # per dimension partition


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
        self._in_doubt: list[list[tuple[Partition, PartitionBatch, int]]] = []  # see _doubt
        self.source: KafkaSource = source_factory(self._assigned, self._revoked, self._lost)
        metrics.latest_rows_bytes.set_function(self._latest_rows_bytes)

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
                    self.partitions[(t, p)] = PartitionState(
                        PartitionBatch(table, t, p), applied.get(p, -1), latest=self._latest_rows(table)
                    )
        log.info("assigned %s", sorted(partitions))
        metrics.assigned_partitions.set(len(self.partitions))

    def _assigned_bounded(self, table, topic: str, partitions: list[int]) -> None:
        """A replay may run beside the live consumer, whose rows lie above the range: so instead of
        the watermark it asks which offsets *inside* its range ClickHouse holds, and skips those."""
        assert self.bounds is not None
        ranges = {p: self.bounds[(topic, p)] for p in partitions if (topic, p) in self.bounds}
        present = self.sink.applied_in_ranges(table.table, topic, ranges)
        for p in partitions:
            state = PartitionState(
                PartitionBatch(table, topic, p), -1, applied=present.get(p), latest=self._latest_rows(table)
            )
            self.partitions[(topic, p)] = state
            if p in ranges and len(ranges[p]) == 0:
                self.finished.add((topic, p))

    def _latest_rows(self, table: TableMapping) -> LatestRows | None:
        if table.role != "dimension":
            return None
        return LatestRows(self.config.latest_rows_kept, self.config.latest_rows_max_bytes)

    def _latest_rows_bytes(self) -> int:
        """For the gauge, read at scrape time (list(): one step under the GIL)."""
        return sum(s.latest.bytes for s in list(self.partitions.values()) if s.latest is not None)

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
                self._flush(partition)
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
                self._flush(partition)
        finally:
            self.source.close()
            self.dlq.close()

    def _stop(self, *_args) -> None:
        log.info("stopping: finishing the batches in flight")
        self.stopping = True

    def step(self) -> None:
        self.last_step = time.monotonic()
        messages = self.source.poll(self.config.poll_messages, self._poll_timeout(self.last_step))
        blocked: set[Partition] = set()
        self._mid_poll = True
        partitions = self.partitions
        try:
            for message in messages:
                partition = (message.topic(), message.partition())
                state = partitions.get(partition)
                if state is None or partition in blocked:
                    continue
                value, offset = message.value(), message.offset()
                size = len(value) if value else 0
                state.consumed += 1
                state.consumed_bytes += size
                # Inline, the common case: the next message of a batch ClickHouse decodes, with
                # the header of the messages before it (a call costs as much as this check).
                batch = state.batch
                if (
                    batch.plan is not None
                    and batch.plan is state.fast_plan
                    and value is not None
                    and value.startswith(state.fast_header)
                    and offset > state.watermark
                ):
                    batch.add_raw(offset, value, size, message.key(), batch.plan)
                elif not self._handle(partition, message):
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
        for partition in list(self.partitions):
            state = self.partitions[partition]
            if partition in self.paused:
                continue
            if state.batch.ready(self.config.batch, now):
                self._flush(partition)
            elif state.batch.messages == 0:
                self._commit_position(partition, state)

    def _poll_timeout(self, now: float) -> float:
        """Wait for messages no longer than until the oldest batch is due: a poll that waits out
        its whole timeout while a batch is due adds that wait to the batch's latency."""
        started = [s.batch.started_at for p, s in self.partitions.items() if s.batch.messages and p not in self.paused]
        if not started:
            return self.config.poll_timeout_s
        due = min(started) + self.config.batch.max_age_s - now
        return min(self.config.poll_timeout_s, max(MIN_POLL_TIMEOUT_S, due))

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
        if self.bounds is not None:
            bound = self.bounds.get(partition)
            if bound is None or offset >= bound.stop:
                # Past the replay's bound: left for the live group (not committed); stop fetching.
                self.source.pause([partition])
                return False
            if offset < bound.start:
                state.batch.skip(offset)
                return True
        if offset <= state.watermark or (state.applied is not None and offset in state.applied):
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

    def _flush(self, partition: Partition) -> bool:
        """Writes the partition's batch and commits it. Batches of other partitions of the same
        table go into the same insert: one insert per table, not per partition, where a retry
        in another shape counts nothing twice (raw fact batches: see _flush_raw; dimension
        rows: versioned, so a row written twice is one row)."""
        state = self.partitions[partition]
        batch = state.batch
        if batch.messages == 0:
            return True
        if batch.raw_values:
            return self._flush_raw(partition)
        group = [partition]
        if batch.table.role == "dimension":
            group = self._group(
                partition, lambda b: b.table is batch.table and b.messages > 0 and not b.raw_values, len(batch.rows)
            )
        batches = [self.partitions[p].batch for p in group]
        try:
            self._insert(batches)
        except UnresolvedPrevious as exc:
            # Rows whose unchanged columns have no previous value anywhere: dead-letter them
            # (with the row) and apply the rest.
            self._dead_letter_unresolved(batches, exc)
            return self._flush(partition)
        except Exception as exc:
            self._insert_failed(group, batch.table.table, exc)
            return False
        self._applied(group)
        return True

    def _group(self, partition: Partition, joins, rows: int) -> list[Partition]:
        """This partition and the others whose batches `joins` accepts (not paused, oldest first)
        while the rows and bytes of them all stay within the batch policy."""
        size = self.partitions[partition].batch.bytes
        policy = self.config.batch
        group = [partition]
        peers = sorted(
            (s.batch.started_at, p)
            for p, s in self.partitions.items()
            if p != partition and p not in self.paused and joins(s.batch)
        )
        for _, peer in peers:
            other = self.partitions[peer].batch
            more = len(other.rows) + len(other.raw_values)
            if rows + more <= policy.max_rows and size + other.bytes <= policy.max_bytes:
                group.append(peer)
                rows, size = rows + more, size + other.bytes
        return sorted(group)

    def _insert_failed(self, partitions: list[Partition], table: str, exc: Exception) -> None:
        metrics.insert_retries.labels(table).inc()
        failures = 0
        for partition in partitions:
            state = self.partitions[partition]
            state.failures += 1
            failures = max(failures, state.failures)
        delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (failures - 1))
        log.error(
            "insert into %s failed (%s: %s); retry in %.1fs, partitions paused", table, type(exc).__name__, exc, delay
        )
        # Also on a final flush (a revocation): the partitions that stay must not grow batches
        # that failed to insert.
        retry_at = time.monotonic() + delay
        for other, other_state in self.partitions.items():
            other_state.retry_at = max(other_state.retry_at, retry_at)
            self._pause(other, other_state)

    def _applied(self, partitions: list[Partition]) -> None:
        """The partitions' batches are in ClickHouse: commit them and start the next ones."""
        if KILL_AFTER_INSERTS and self.inserts == KILL_AFTER_INSERTS:
            os.kill(os.getpid(), signal.SIGKILL)
        self.dlq.flush()
        started = time.perf_counter()
        offsets = {}
        for partition in partitions:
            batch = self.partitions[partition].batch
            # The position is past any transaction marker after the last record, so a caught-up
            # group shows a lag of 0 rather than 1 per transaction-ending partition. Not mid-poll
            # (a schema change flushing the table's batches): the position is then also past
            # messages of this poll that no batch holds yet, and committing it would lose them.
            position = None if self._mid_poll or self._replaying else self.source.position(partition)
            next_offset = self._bounded(partition, max(batch.last_offset + 1, position or 0))
            if next_offset is not None:
                offsets[partition] = next_offset
        if offsets and self.source.commit(offsets):
            for partition, offset in offsets.items():
                self._committed(partition, self.partitions[partition], offset)
        metrics.commit_seconds.observe(time.perf_counter() - started)
        for partition in partitions:
            state = self.partitions[partition]
            batch = state.batch
            state.failures = 0
            if batch.last_row_offset is not None:
                state.watermark = max(state.watermark, batch.last_row_offset)
            state.batch = PartitionBatch(batch.table, batch.topic, batch.partition)

    def _insert(self, batches: list[PartitionBatch]) -> None:
        rows = [row for batch in batches for row in batch.rows]
        if not rows:
            return
        first = batches[0]
        assertions: set[int] = set()
        start = 0
        for batch in batches:
            assertions.update(start + i for i in batch.assertions)
            start += len(batch.rows)
        table = first.table.table
        started = time.perf_counter()
        token = ",".join(b.dedup_token for b in batches if b.rows) + self.token_suffix
        latest = {(b.topic, b.partition): self.partitions[(b.topic, b.partition)].latest for b in batches}
        self.sink.insert(first.table, first.column_names, rows, token, assertions, latest)
        self._inserted(table, started, len(rows), (ms for batch in batches for ms in batch.commit_ts_ms))

    def _inserted(self, table: str, started: float, rows: int, commit_ts_ms: Iterable[int]) -> None:
        """Metrics of an insert that returned; latency from the Postgres commit times given
        (consumed only after the insert's end is taken)."""
        finished = time.time()
        metrics.insert_seconds.labels(table).observe(time.perf_counter() - started)
        metrics.rows_inserted.labels(table).inc(rows)
        metrics.batch_rows.labels(table).observe(rows)
        metrics.last_insert_timestamp.set(finished)
        latency = metrics.end_to_end_seconds.labels(table)
        for commit_ms in commit_ts_ms:
            latency.observe(max(0.0, finished - commit_ms / 1000))
        self.inserts += 1

    # -- the fast lane: ClickHouse decodes (consumer/sink/server_plan.py) ------------------------
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
                batch.add_raw(offset, value, size, message.key(), plan)
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
        complete = True
        self._replaying = True
        try:
            for offset, key, value in zip(offsets, keys, values, strict=True):
                if not self._handle(partition, _Replayed(partition, offset, key, value)):
                    complete = False  # paused and seeked back to `offset`: the rest comes again
                    break
        finally:
            self._replaying = False
        if complete:
            # Counters include the skipped messages (tombstones) between the raw ones.
            new = state.batch
            new.messages, new.last_offset, new.bytes = old.messages, old.last_offset, old.bytes
            new.started_at = old.started_at

    def _raw_group(self, partition: Partition) -> list[Partition]:
        """The partitions whose batches go into one insert with this one's: the table's other
        batches for ClickHouse to decode with the same plan; or, after an insert failed,
        exactly the partitions it had."""
        doubt = self._doubt_of(partition)
        if doubt is not None:
            return [p for p, _, _ in doubt]
        batch = self.partitions[partition].batch
        taken = {p for doubt in self._in_doubt for p, _, _ in doubt}
        return self._group(
            partition,
            lambda b: b.raw_values and b.plan is batch.plan and (b.topic, b.partition) not in taken,
            len(batch.raw_values),
        )

    def _flush_raw(self, partition: Partition, alone: bool = False) -> bool:
        state = self.partitions[partition]
        table, topic = state.batch.table.table, state.batch.topic
        group, sent = [partition], False
        try:
            self._settle(partition)
            if not state.batch.raw_values:
                return self._flush(partition)  # ClickHouse had them all: only the commit is left
            if not alone:
                group = self._raw_group(partition)
            sent = True
            self._insert_raw(group)
        except Rejected as exc:
            states = [self.partitions[p] for p in group]
            applied = self.sink.applied_offsets(table, topic)
            if any(applied.get(p[1], -1) > s.watermark for p, s in zip(group, states, strict=True)):
                # Rows of this insert did reach ClickHouse (a view failed after the facts were
                # written): only the same insert again, deduplicated, may complete it.
                self._doubt(group)
                self._insert_failed(group, table, exc)
                return False
            self._forget_doubt(group)
            if len(group) > 1:
                log.info("ClickHouse refused the batches of %s (%s); trying them one by one", group, exc)
                return all(self._flush_raw(p, alone=True) for p in group)
            log.warning("%s[%d]: ClickHouse refused the batch (%s); applying it in Python", *partition, exc)
            server_fallbacks.labels(table).inc()
            state.fast_after = state.batch.last_offset + 1 + state.fast_penalty
            state.fast_penalty = min(max(1_000, 2 * state.fast_penalty), 1_000_000)
            self._demote(partition, state)
            return self._flush(partition)
        except Exception as exc:
            if sent:
                self._doubt(group)
            self._insert_failed(group, table, exc)
            return False
        self._forget_doubt(group)
        for member in group:
            self.partitions[member].fast_penalty = 0
        self._applied(group)
        return True

    # Raw inserts that failed where ClickHouse may have written them: each is sent again only
    # as it was (the same partitions' same messages, so the same deduplication token), since a
    # write of the same messages under another token would count them twice.
    def _doubt(self, group: list[Partition]) -> None:
        self._forget_doubt(group)
        self._in_doubt.append([(p, self.partitions[p].batch, len(self.partitions[p].batch.raw_values)) for p in group])

    def _doubt_of(self, partition: Partition) -> list[tuple[Partition, PartitionBatch, int]] | None:
        return next((doubt for doubt in self._in_doubt if any(p == partition for p, _, _ in doubt)), None)

    def _forget_doubt(self, group: list[Partition]) -> None:
        self._in_doubt = [doubt for doubt in self._in_doubt if not any(p in group for p, _, _ in doubt)]

    def _settle(self, partition: Partition) -> None:
        """A failed insert that can no longer be sent as it was (a partition was lost or revoked
        meanwhile, or a batch grew): ask ClickHouse what it holds of it — one block, so all of it
        or nothing — and leave only the rest in the batches."""
        doubt = self._doubt_of(partition)
        if doubt is None:
            return
        members = [(p, b) for p, b, n in doubt if p in self.partitions and self.partitions[p].batch is b]
        if len(members) == len(doubt) and all(len(b.raw_values) == n for _, b, n in doubt):
            return
        batch = self.partitions[partition].batch
        applied = self.sink.applied_offsets(batch.table.table, batch.topic) if members else {}
        self._in_doubt.remove(doubt)
        for p, member in members:
            watermark = applied.get(p[1], -1)
            state = self.partitions[p]
            if watermark > state.watermark:
                log.warning("%s[%d]: a failed insert had been written up to offset %d", *p, watermark)
                state.watermark = watermark
                member.drop_raw_through(watermark)

    def _insert_raw(self, group: list[Partition]) -> None:
        """One insert of the group's raw batches. Rejected: ClickHouse refused it (normally
        having written nothing)."""
        assert self.server is not None
        batches = [self.partitions[p].batch for p in group]
        table = batches[0].table.table
        started = time.perf_counter()
        self.server.insert(
            batches[0].plan,
            [(b.partition, b.raw_offsets, b.raw_values) for b in batches],
            ",".join(b.raw_dedup_token for b in batches) + self.token_suffix,
        )
        # Latency: the commit times of about LATENCY_SAMPLES changes, evenly spread (decoding
        # all of them in Python is what the fast lane avoids); no list of all the values.
        count = sum(len(b.raw_values) for b in batches)
        step = max(1, count // LATENCY_SAMPLES)
        sampled = [v for b in batches for v in b.raw_values[::step]]
        self._inserted(table, started, count, self._commit_times(sampled))

    def _commit_times(self, values: list[bytes]) -> Iterator[int]:
        for value in values:
            try:
                event = self.decoder.decode(value)
            except Exception:  # ClickHouse took it; Python's opinion only matters for the metric
                continue
            if event is not None and event.commit_ts_ms is not None:
                yield event.commit_ts_ms

    def _dead_letter_unresolved(self, batches: list[PartitionBatch], exc: UnresolvedPrevious) -> None:
        bad = set(exc.changes)
        for batch in batches:
            offset_index = batch.column_names.index("_offset")
            for row in batch.rows:
                if (batch.partition, row[offset_index]) in bad:
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
            batch.rows = [row for row in batch.rows if (batch.partition, row[offset_index]) not in bad]

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


# Enough for the latency histogram's tail at about one insert per table and second; each sample
# is a full decode in Python (~15 µs), which the fast lane otherwise avoids.
LATENCY_SAMPLES = 64
# A poll returns at the latest when the oldest batch is due, but never spins.
MIN_POLL_TIMEOUT_S = 0.01


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
