"""The engine's loop: source → decode → map → batch → sink → commit (DESIGN.md draws it).

Exactly-once effect without an extra store: every row carries the Kafka offset of the change
that produced it, so ClickHouse itself knows, per partition, the highest offset it holds (the
applied watermark). On assignment the engine reads that watermark and skips what is at or
below it. A crash between insert and commit, a rebalance, an offset reset or a replay all
re-deliver messages the watermark already covers: they are skipped, never counted twice.
Offsets are committed only after the insert returned (commit.py), so nothing is lost either.

This module owns the assignment and the partitions' phases (partition.py); the lanes
(python_lane.py, clickhouse_lane.py) own how a message becomes rows in ClickHouse.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Message

from consumer.core.errors import DeadLetterUnavailable, MappingError
from consumer.decode.envelope import EnvelopeDecoder
from consumer.engine.batch import BatchPolicy, PartitionBatch
from consumer.engine.bounds import Admission, Bounds, Unbounded
from consumer.engine.breaker import PoisonBreaker
from consumer.engine.clickhouse_lane import ClickHouseLane
from consumer.engine.commit import CommitPolicy
from consumer.engine.dlq import DeadLetterQueue
from consumer.engine.lanes import Applied, Assignment, Failed, FlushOutcome, Rejected
from consumer.engine.partition import PartitionState
from consumer.engine.python_lane import PythonLane
from consumer.engine.report import RunReport
from consumer.kafka.source import KafkaSource, Partition
from consumer.ops import metrics
from consumer.sink.clickhouse import ClickHouseSink, LatestRows
from consumer.sink.refusals import first_line, refused_for_data
from consumer.sink.server_plan import for_sink
from consumer.transform.mapping import Mapper, Mapping, NewColumns, TableMapping

log = logging.getLogger(__name__)

# Fault injection for the crash tests: SIGKILL this process right after the Nth successful
# insert, before its offsets are committed (the moment a crash is most likely to double-count).
KILL_AFTER_INSERTS = int(os.environ.get("CDC_FAULT_KILL_AFTER_INSERTS", "0"))
# A poll returns at the latest when the oldest batch is due, but never spins.
MIN_POLL_TIMEOUT_S = 0.01


@dataclass
class PipelineConfig:
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    poll_messages: int = 10_000
    poll_timeout_s: float = 0.2
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    # Fact batches decoded and mapped by ClickHouse itself (the ClickHouse lane).
    server_decode: bool = True
    latest_rows_kept: int = 10_000  # per dimension partition (consumer.sink.clickhouse.LatestRows)
    latest_rows_max_bytes: int = 32 * 2**20  # per dimension partition
    poison_breaker_share: float = 0.5  # consumer.engine.breaker
    poison_breaker_min_messages: int = 100
    poison_breaker_window_s: float = 60.0


class Pipeline:
    def __init__(
        self,
        *,
        source_factory: Callable[..., KafkaSource],
        decoder: EnvelopeDecoder,
        mapper: Mapper,
        sink: ClickHouseSink,
        dlq: DeadLetterQueue,
        config: PipelineConfig | None = None,
        bounds: Bounds | None = None,
    ):
        self.decoder = decoder
        self.mapper = mapper
        self.sink = sink
        self.dlq = dlq
        self.config = config or PipelineConfig()
        self.bounds = bounds or Unbounded()
        self.report = RunReport()
        self.partitions: dict[Partition, PartitionState] = {}
        self.stopping = False
        self.last_step = time.monotonic()  # for the liveness probe
        self._mid_poll = False  # while messages are being handed to their batches
        self._last_insert: dict[str, float] = {}  # table → when its last insert returned
        self.source = source_factory(self._assigned, self._revoked, self._lost)
        self.commits = CommitPolicy(self.source, self.bounds)
        assignment = Assignment(self.partitions, self.config.batch, self.report)
        suffix = self.bounds.token_suffix
        config = self.config
        self.breaker = PoisonBreaker(
            config.poison_breaker_share, config.poison_breaker_min_messages, config.poison_breaker_window_s
        )
        self.python = PythonLane(
            assignment, decoder, mapper, sink, dlq, evolve=self._evolve, breaker=self.breaker, token_suffix=suffix
        )
        # The ClickHouse lane serves the live service only: a replay decodes in Python.
        server = for_sink(sink, decoder) if self.config.server_decode and self.bounds.live else None
        self.clickhouse = ClickHouseLane(assignment, server, sink, decoder, suffix) if server else None
        metrics.latest_rows_bytes.set_function(self._latest_rows_bytes)

    @property
    def mapping(self) -> Mapping:
        return self.mapper.mapping

    @property
    def paused(self) -> set[Partition]:
        return {p for p, s in list(self.partitions.items()) if s.paused}

    @property
    def ready(self) -> bool:
        """For the readiness probe: false while partitions are held back by errors (also between
        two retries, while a partition is resumed to try again)."""
        return all(s.ready for s in list(self.partitions.values()))

    @property
    def done(self) -> bool:
        """A bounded run whose every partition reached its bound."""
        return self.bounds.done

    # -- rebalances -------------------------------------------------------------------------
    def _assigned(self, partitions: list[Partition]) -> None:
        metrics.rebalances.labels("assign").inc()
        for topic in {t for t, _ in partitions}:
            table = self.mapping.for_topic(topic)
            missing = self.sink.missing_columns(table)
            if missing:
                self.sink.add_columns(table.table, missing)
            mine = [p for t, p in partitions if t == topic]
            for p, marks in self.bounds.watermarks(self.sink, table, topic, mine).items():
                state = PartitionState(
                    (topic, p),
                    PartitionBatch(table, topic, p),
                    marks.watermark,
                    applied=marks.applied,
                    latest=self._latest_rows(table),
                )
                if self.bounds.reached((topic, p), -1):
                    state.finish()
                self.partitions[(topic, p)] = state
        log.info("assigned %s", sorted(partitions))
        metrics.assigned_partitions.set(len(self.partitions))

    def _latest_rows(self, table: TableMapping) -> LatestRows | None:
        if table.role != "dimension":
            return None
        return LatestRows(self.config.latest_rows_kept, self.config.latest_rows_max_bytes)

    def _latest_rows_bytes(self) -> int:
        """For the gauge, read at scrape time (list(): one step under the GIL)."""
        return sum(s.latest.bytes for s in list(self.partitions.values()) if s.latest is not None)

    def _revoked(self, partitions: list[Partition]) -> None:
        metrics.rebalances.labels("revoke").inc()
        for partition in partitions:
            if partition in self.partitions:
                # Best effort: what cannot be flushed now is re-read by the next owner, and
                # the watermark makes that safe.
                self._flush(partition)
                self.partitions.pop(partition, None)
        log.info("revoked %s", sorted(partitions))
        self._partitions_changed()

    def _lost(self, partitions: list[Partition]) -> None:
        """The group took these partitions without a clean handover: nothing may be committed
        for them; their uncommitted rows are covered by the watermark when re-read."""
        metrics.rebalances.labels("lost").inc()
        for partition in partitions:
            self.partitions.pop(partition, None)
        log.warning("lost %s", sorted(partitions))
        self._partitions_changed()

    def _partitions_changed(self) -> None:
        metrics.assigned_partitions.set(len(self.partitions))
        metrics.paused_partitions.set(len(self.paused))

    # -- the loop ---------------------------------------------------------------------------
    def run(self, on_step: Callable[[], None] | None = None) -> RunReport:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.source.start()
        try:
            while not self.stopping and not self.bounds.done:
                self.step()
                if on_step is not None:
                    on_step()
            self.flush_all()
        finally:
            self.source.close()
            self.dlq.close()
        return self.report

    def _stop(self, *_args) -> None:
        log.info("stopping: finishing the batches in flight")
        self.stopping = True

    def flush_all(self) -> None:
        for partition in list(self.partitions):
            self._flush(partition)

    def step(self) -> None:
        self.last_step = time.monotonic()
        messages = self.source.poll(self.config.poll_messages, self._poll_timeout(self.last_step))
        held: set[Partition] = set()
        self._mid_poll = True
        partitions = self.partitions
        try:
            for message in messages:
                partition = (message.topic(), message.partition())
                state = partitions.get(partition)
                if state is None or partition in held:
                    continue
                value, offset = message.value(), message.offset()
                size = len(value) if value else 0
                state.consumed += 1
                state.consumed_bytes += size
                # Inline, the common case: the next message of a batch the ClickHouse lane holds,
                # with the header of the messages before it (a call costs as much as this check).
                batch = state.batch
                if (
                    batch.plan is not None
                    and batch.plan is state.fast_plan
                    and value is not None
                    and value.startswith(state.fast_header)
                    and offset > state.watermark
                ):
                    batch.add_raw(offset, value, size, message.key(), batch.plan)
                elif not self.offer(message):
                    held.add(partition)
        finally:
            self._mid_poll = False
        self._after_poll(time.monotonic(), caught_up=len(messages) < self.config.poll_messages)

    def _after_poll(self, now: float, caught_up: bool) -> None:
        for partition, state in list(self.partitions.items()):
            if state.consumed:
                labels = (partition[0], str(partition[1]))
                metrics.messages_consumed.labels(*labels).inc(state.consumed)
                metrics.bytes_consumed.labels(*labels).inc(state.consumed_bytes)
                self.report.messages_read += state.consumed
                self.breaker.read(partition[0], state.consumed)
                state.consumed = state.consumed_bytes = 0
            if state.due(now):
                self.source.resume([partition])
        metrics.paused_partitions.set(len(self.paused))
        for partition in list(self.partitions):
            state = self.partitions[partition]
            if state.paused:
                continue
            batch = state.batch
            if batch.ready(self.config.batch, now) or (caught_up and batch.messages and self._may_insert(batch, now)):
                self._flush(partition)
            elif batch.messages == 0:
                self.commits.idle(state)

    def _may_insert(self, batch: PartitionBatch, now: float) -> bool:
        return self.config.batch.flush_when_caught_up and now >= self._next_insert_at(batch.table.table)

    def _next_insert_at(self, table: str) -> float:
        return self._last_insert.get(table, float("-inf")) + self.config.batch.min_insert_interval_s

    def _poll_timeout(self, now: float) -> float:
        """Wait for messages no longer than until a batch may be written (its age, or its table's
        next insert when caught up): a poll that waits out its whole timeout while a batch is due
        adds that wait to the batch's latency."""
        pending = [s.batch for s in self.partitions.values() if s.batch.messages and not s.paused]
        if not pending:
            return self.config.poll_timeout_s
        policy = self.config.batch
        due = min(b.started_at for b in pending) + policy.max_age_s
        if policy.flush_when_caught_up:
            due = min(due, min(self._next_insert_at(b.table.table) for b in pending))
        return min(self.config.poll_timeout_s, max(MIN_POLL_TIMEOUT_S, due - now))

    def offer(self, message: Message) -> bool:
        """Hands one message to its partition's batch. False: stop reading this partition for now."""
        partition = (message.topic(), message.partition())
        state = self.partitions[partition]
        offset, value = message.offset(), message.value()
        size = len(value) if value else 0
        admission = self.bounds.admit(partition, offset)
        if admission is Admission.STOP:
            self.source.pause([partition])  # left for the live group, not committed
            return False
        if admission is Admission.SKIP:
            state.batch.skip(offset)
            return True
        if offset <= state.watermark or (state.applied is not None and offset in state.applied):
            metrics.messages_skipped.labels(partition[0]).inc()
            self.report.already_applied += 1
            state.batch.skip(offset)
            return True
        lane = self.clickhouse
        if lane is not None and (state.batch.raw_values or not state.batch.rows):
            if lane.offer(state, offset, message.key(), value, size):
                return True
            if state.batch.raw_values and not self._to_python_lane(state):
                return False
        return self._offer_python(state, offset, message.key(), value, size)

    def _offer_python(self, state: PartitionState, offset: int, key, value, size: int) -> bool:
        if self.python.offer(state, offset, key, value, size):
            return True
        self.source.seek(state.partition, offset)
        delay = max(self.config.retry_base_s, self.breaker.hold_s(state.partition[0]))
        if state.wait(time.monotonic() + delay):
            self.source.pause([state.partition])
        return False

    def _to_python_lane(self, state: PartitionState) -> bool:
        """The batch's raw messages go through the Python lane, in order, as if they had never
        taken the ClickHouse lane (so poison among them is dead-lettered as without it).
        False: one of them cannot be applied yet; the partition re-reads from it."""
        old = state.batch
        keys = old.raw_keys
        offsets, values = old.take_raw()
        state.batch = PartitionBatch(old.table, old.topic, old.partition)
        mid_poll, self._mid_poll = self._mid_poll, True
        try:
            for offset, key, value in zip(offsets, keys, values, strict=True):
                if not self._offer_python(state, offset, key, value, len(value)):
                    return False
        finally:
            self._mid_poll = mid_poll
        # Counters include the skipped messages (tombstones) between the raw ones.
        new = state.batch
        new.messages, new.last_offset, new.bytes, new.started_at = (
            old.messages,
            old.last_offset,
            old.bytes,
            old.started_at,
        )
        return True

    def _evolve(self, change: NewColumns) -> TableMapping:
        """The source table gained columns: flush every batch of the old shape, add the columns
        in ClickHouse, and carry on with the wider mapping — no restart."""
        name = change.table.table
        for partition, state in self.partitions.items():
            if state.batch.table.table == name and not self._flush(partition):
                raise BlockingIOError(f"{name}: batches must be written before its columns change")
        try:
            self.sink.add_columns(name, [(c.name, c.clickhouse_type) for c in change.columns])
        except Exception as exc:
            if refused_for_data(exc):
                raise MappingError(
                    "bad_new_column", f"{name}: ClickHouse refused {change}: {first_line(exc)}"
                ) from None
            raise BlockingIOError(f"{name}: cannot add columns now ({first_line(exc)})") from exc
        widened = change.table.with_columns(change.columns)
        self.mapper.mapping = self.mapping.replaced(widened)
        for state in self.partitions.values():
            if state.batch.table.table == name:
                state.batch = PartitionBatch(widened, state.batch.topic, state.batch.partition)
        return widened

    # -- flushing ---------------------------------------------------------------------------
    def _flush(self, partition: Partition, alone: bool = False) -> bool:
        """Writes the partition's batch (with others of its table, as its lane groups them) and
        commits. False: it failed, and every partition backs off."""
        state = self.partitions[partition]
        if state.batch.messages == 0:
            return True
        try:
            self.dlq.flush()  # nothing past a dead-lettered message is written before the DLQ holds it
        except DeadLetterUnavailable as exc:
            self._insert_failed([partition], state.batch.table.table, exc)
            return False
        if state.batch.raw_values:
            assert self.clickhouse is not None
            outcome = self.clickhouse.flush(partition, alone)
        else:
            outcome = self.python.flush(partition)
        return self._conclude(state, outcome)

    def _conclude(self, state: PartitionState, outcome: FlushOutcome) -> bool:
        match outcome:
            case Applied(group):
                self._last_insert[state.batch.table.table] = time.monotonic()
                self._applied(group)
                return True
            case Failed(group, table, error):
                self._insert_failed(group, table, error)
                return False
            case Rejected(group, reason) if len(group) > 1:
                log.info("ClickHouse refused the batches of %s (%s); trying them one by one", group, reason)
                return all(self._flush(p, alone=True) for p in group)
            case Rejected(_, reason):
                log.warning(
                    "%s[%d]: ClickHouse refused the batch (%s); applying it in Python", *state.partition, reason
                )
                assert self.clickhouse is not None
                self.clickhouse.refused(state)
                self._to_python_lane(state)
                return self._flush(state.partition)
        raise AssertionError(outcome)

    def _insert_failed(self, partitions: list[Partition], table: str, exc: Exception) -> None:
        metrics.insert_retries.labels(table).inc()
        failures = 1 + max(self.partitions[p].failures for p in partitions)
        delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (failures - 1))
        log.error(
            "writing %s failed (%s: %s); retry in %.1fs, partitions paused", table, type(exc).__name__, exc, delay
        )
        # Every partition backs off, not only the failed ones (backpressure: nothing grows while
        # ClickHouse cannot take it); also on a final flush (a revocation).
        until = time.monotonic() + delay
        for partition, state in self.partitions.items():
            pause = state.insert_failed(until) if partition in partitions else state.hold(until)
            if pause:
                self.source.pause([partition])
        metrics.paused_partitions.set(len(self.paused))

    def _applied(self, partitions: list[Partition]) -> None:
        """The partitions' batches are in ClickHouse: commit them and start the next ones."""
        if KILL_AFTER_INSERTS and self.report.inserts == KILL_AFTER_INSERTS:
            os.kill(os.getpid(), signal.SIGKILL)
        states = [self.partitions[p] for p in partitions]
        self.commits.after_insert(states, mid_poll=self._mid_poll)
        for state in states:
            state.batch_applied()
