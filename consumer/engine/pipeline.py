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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from confluent_kafka import Message

from consumer.core.errors import DeadLetterUnavailable, MappingError
from consumer.decode.envelope import EnvelopeDecoder
from consumer.engine.batch import BatchPolicy, PartitionBatch
from consumer.engine.bounds import Admission, Bounds, Unbounded, Watermarks
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
from consumer.sink.shards import Shards
from consumer.transform.mapping import ColumnMapping, Mapper, Mapping, NewColumns, TableMapping

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
    max_evolved_columns: int = 100  # per table, over its life (consumer.settings)
    # Tables written side by side when several are due at once (1: one after another).
    insert_concurrency: int = 4


class Pipeline:
    def __init__(
        self,
        *,
        source_factory: Callable[..., KafkaSource],
        decoder: EnvelopeDecoder,
        mapper: Mapper,
        sink: ClickHouseSink | Shards,
        dlq: DeadLetterQueue,
        config: PipelineConfig | None = None,
        bounds: Bounds | None = None,
    ):
        self.decoder = decoder
        self.mapper = mapper
        # One server is one shard; on a cluster each partition's rows go to its own shard.
        self.shards = sink if isinstance(sink, Shards) else Shards([sink])
        self.dlq = dlq
        self.config = config or PipelineConfig()
        self.bounds = bounds or Unbounded()
        self.report = RunReport()
        self.partitions: dict[Partition, PartitionState] = {}
        self.stopping = False
        self.last_step = time.monotonic()  # for the liveness probe
        self._mid_poll = False  # while messages are being handed to their batches
        self._last_insert: dict[str, float] = {}  # table → when its last insert returned
        # Each table's insert waits on ClickHouse, not on the other tables': written side by side,
        # a burst of changes to every table costs the slowest insert, not their sum.
        self._writers = (
            ThreadPoolExecutor(self.config.insert_concurrency, thread_name_prefix="insert")
            if self.config.insert_concurrency > 1
            else None
        )
        self.source = source_factory(self._assigned, self._revoked, self._lost)
        self.commits = CommitPolicy(self.source, self.bounds)
        assignment = Assignment(self.partitions, self.config.batch, self.report)
        suffix = self.bounds.token_suffix
        config = self.config
        self.breaker = PoisonBreaker(
            config.poison_breaker_share, config.poison_breaker_min_messages, config.poison_breaker_window_s
        )
        self.python = PythonLane(
            assignment,
            decoder,
            mapper,
            self.shards,
            dlq,
            evolve=self._evolve,
            breaker=self.breaker,
            token_suffix=suffix,
        )
        # The ClickHouse lane serves the live service only: a replay decodes in Python.
        servers = [for_sink(s, decoder) for s in self.shards.sinks] if config.server_decode and self.bounds.live else []
        self.clickhouse = (
            ClickHouseLane(assignment, servers, self.shards, decoder, suffix) if servers and all(servers) else None
        )
        metrics.latest_rows_bytes.set_function(self._latest_rows_bytes)

    @property
    def mapping(self) -> Mapping:
        return self.mapper.mapping

    @property
    def paused(self) -> set[Partition]:
        return {p for p, s in list(self.partitions.items()) if s.paused}

    @property
    def shards_down(self) -> list[str]:
        """The shards (numbered from 1) whose last insert failed."""
        return sorted(map(self.shards.label, self.shards.down))

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
            missing = self._missing_columns(table)
            if missing:
                self.shards.add_columns(table.table, missing)
            mine = [p for t, p in partitions if t == topic]
            for shard in range(len(self.shards)):
                on_shard = [p for p in mine if self.shards.of(p) == shard]
                if on_shard:
                    self._assign(table, topic, shard, self._watermarks(table, topic, shard, on_shard))
        log.info("assigned %s", sorted(partitions))
        metrics.assigned_partitions.set(len(self.partitions))

    def _missing_columns(self, table: TableMapping) -> list[tuple[str, str]]:
        """Asked of the first shard that answers (every shard has the same columns)."""
        for sink in self.shards.sinks[:-1]:
            try:
                return sink.missing_columns(table)
            except Exception as exc:
                log.warning("%s: cannot read its columns from a shard (%s); asking the next", table.table, exc)
        return self.shards.sinks[-1].missing_columns(table)

    def _watermarks(
        self, table: TableMapping, topic: str, shard: int, partitions: list[int]
    ) -> dict[int, Watermarks | None]:
        """What the shard holds of these partitions; None for each while it does not answer:
        they are assigned all the same, and wait for it (learn_watermark) while the other shards'
        partitions go on."""
        try:
            if self.shards.answers(shard):
                return self.bounds.watermarks(self.shards.sinks[shard], table.table, topic, partitions)
        except Exception as exc:
            log.warning("%s%s: shard %s does not answer (%s)", topic, partitions, self.shards.label(shard), exc)
        self.shards.reached(shard, up=False)
        return dict.fromkeys(partitions)

    def _learn_watermark(self, state: PartitionState) -> bool:
        """A partition assigned while its shard did not answer: ask again."""
        topic, p = state.partition
        marks = self._watermarks(state.batch.table, topic, state.shard, [p])[p]
        if marks is None:
            return False
        state.watermark, state.applied, state.watermark_known = marks.watermark, marks.applied, True
        state.failures = 0  # nothing of it was batched yet: only the watermark had failed
        return True

    def _assign(self, table: TableMapping, topic: str, shard: int, watermarks: dict[int, Watermarks | None]) -> None:
        for p, marks in watermarks.items():
            state = PartitionState(
                (topic, p),
                PartitionBatch(table, topic, p),
                -1 if marks is None else marks.watermark,
                applied=None if marks is None else marks.applied,
                latest=self._latest_rows(table),
                shard=shard,
                watermark_known=marks is not None,
            )
            if self.bounds.reached((topic, p), -1):
                state.finish()
            self.partitions[(topic, p)] = state

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
            if self._writers is not None:
                self._writers.shutdown()
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
        due = []
        for partition, state in list(self.partitions.items()):
            if state.paused:
                continue
            batch = state.batch
            if batch.ready(self.config.batch, now) or (caught_up and batch.messages and self._may_insert(batch, now)):
                due.append(partition)
            elif batch.messages == 0:
                self.commits.idle(state)
        self._flush_due(due)

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
        if not state.watermark_known and not self._learn_watermark(state):
            # Read again from here once its shard answers; backs off like a failed insert.
            self.source.seek(partition, offset)
            delay = min(self.config.retry_max_s, self.config.retry_base_s * 2**state.failures)
            if state.insert_failed(time.monotonic() + delay):
                self.source.pause([partition])
            return False
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
        self._check_evolution_cap(change)
        for partition, state in self.partitions.items():
            if state.batch.table.table == name and not self._flush(partition):
                raise BlockingIOError(f"{name}: batches must be written before its columns change")
        try:
            self.shards.add_columns(name, [(c.name, c.clickhouse_type) for c in change.columns], evolved=True)
        except Exception as exc:
            if refused_for_data(exc):
                raise MappingError(
                    "bad_new_column", f"{name}: ClickHouse refused {change}: {first_line(exc)}"
                ) from None
            raise BlockingIOError(f"{name}: cannot add columns now ({first_line(exc)})") from exc
        widened = change.table.with_columns(self._as_stored(name, change.columns))
        self.mapper.mapping = self.mapping.replaced(widened)
        for state in self.partitions.values():
            if state.batch.table.table == name:
                state.batch = PartitionBatch(widened, state.batch.topic, state.batch.partition)
        return widened

    def _as_stored(self, table: str, columns: list[ColumnMapping]) -> list[ColumnMapping]:
        """The added columns with the types ClickHouse gave them: a column another consumer (or
        this one before a restart) added first keeps the type it was added with, whatever the
        value that found it missing this time. MappingError for a type the mapping cannot hold."""
        try:
            stored = self.shards.sinks[-1].columns(table)
        except Exception as exc:
            raise BlockingIOError(f"{table}: cannot read its columns now ({first_line(exc)})") from exc
        widened = []
        for column in columns:
            stored_type = stored.get(column.name, (column.clickhouse_type, ""))[0]
            try:
                widened.append(column if stored_type == column.clickhouse_type else column.of_type(stored_type))
            except ValueError as exc:
                raise MappingError("bad_new_column", f"{table}.{column.name}: {exc}") from None
        return widened

    def _check_evolution_cap(self, change: NewColumns) -> None:
        """MappingError("too_many_new_columns") when the change would take the table beyond the
        columns evolution may add to it (counted in ClickHouse, so across restarts)."""
        name = change.table.table
        try:
            evolved = self.shards.sinks[-1].evolved_columns(name)
        except Exception as exc:
            raise BlockingIOError(f"{name}: cannot read its columns now ({first_line(exc)})") from exc
        wanted = evolved | {c.name for c in change.columns}
        if len(wanted) > self.config.max_evolved_columns:
            raise MappingError(
                "too_many_new_columns",
                f"{change} would make {len(wanted)} columns added by schema evolution, more than "
                f"CDC_MAX_EVOLVED_COLUMNS={self.config.max_evolved_columns}; the table is left as it is",
            )

    # -- flushing ---------------------------------------------------------------------------
    def _flush_due(self, due: list[Partition]) -> None:
        """Writes the due batches. One partition per table leads (its lane puts the table's other
        batches in its insert), and the leaders' inserts run side by side; each outcome is then
        concluded here, one by one, in this thread: commits, back-off and what a refusal asks for.
        What is still due after that (a paused shard's, a batch a group left out) goes one by one."""
        leaders: dict[str, Partition] = {}
        for partition in due:
            leaders.setdefault(self.partitions[partition].batch.table.table, partition)
        if self._writers is not None and len(leaders) > 1 and self._dead_letters_stored(due):
            leading = list(leaders.values())
            for partition, outcome in zip(leading, self._writers.map(self._write, leading), strict=True):
                self._conclude(self.partitions[partition], outcome)
        for partition in due:
            state = self.partitions.get(partition)
            if state is not None and not state.paused:
                self._flush(partition)

    def _flush(self, partition: Partition, alone: bool = False) -> bool:
        """Writes the partition's batch (with others of its table, as its lane groups them) and
        commits. False: it failed, and every partition backs off."""
        state = self.partitions[partition]
        if state.batch.messages == 0:
            return True
        if not self._dead_letters_stored([partition]):
            return False
        return self._conclude(state, self._write(partition, alone))

    def _dead_letters_stored(self, partitions: list[Partition]) -> bool:
        """Nothing past a dead-lettered message is written before the dead-letter topic holds it."""
        try:
            self.dlq.flush()
        except DeadLetterUnavailable as exc:
            self._insert_failed(partitions, self.partitions[partitions[0]].batch.table.table, exc, every_shard=True)
            return False
        return True

    def _write(self, partition: Partition, alone: bool = False) -> FlushOutcome:
        """The insert of the partition's batch, by its lane; safe beside another table's."""
        state = self.partitions[partition]
        if not self.shards.answers(state.shard):
            label = self.shards.label(state.shard)
            return Failed([partition], state.batch.table.table, ConnectionError(f"shard {label} does not answer"))
        if state.batch.raw_values:
            assert self.clickhouse is not None
            return self.clickhouse.flush(partition, alone)
        return self.python.flush(partition)

    def _conclude(self, state: PartitionState, outcome: FlushOutcome) -> bool:
        match outcome:
            case Applied(group):
                self._last_insert[state.batch.table.table] = time.monotonic()
                self.shards.reached(state.shard, up=True)
                self._applied(group)
                return True
            case Failed(group, table, error):
                self.shards.reached(state.shard, up=False)
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

    def _insert_failed(
        self, partitions: list[Partition], table: str, exc: Exception, every_shard: bool = False
    ) -> None:
        metrics.insert_retries.labels(table).inc()
        failures = 1 + max(self.partitions[p].failures for p in partitions)
        delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (failures - 1))
        log.error(
            "writing %s failed (%s: %s); retry in %.1fs, partitions paused", table, type(exc).__name__, exc, delay
        )
        # Every partition of the failed shard backs off, not only the failed ones (backpressure:
        # nothing grows while ClickHouse cannot take it); also on a final flush (a revocation).
        # The other shards' partitions keep flowing; a dead-letter topic that cannot store holds
        # back every shard.
        until = time.monotonic() + delay
        failed = {self.partitions[p].shard for p in partitions}
        for partition, state in self.partitions.items():
            if not every_shard and state.shard not in failed:
                continue
            pause = state.insert_failed(until) if partition in partitions else state.hold(until)
            if pause:
                self.source.pause([partition])
        metrics.paused_partitions.set(len(self.paused))

    def _applied(self, partitions: list[Partition]) -> None:
        """The partitions' batches are in ClickHouse: commit them and start the next ones."""
        if KILL_AFTER_INSERTS and self.report.inserts >= KILL_AFTER_INSERTS:
            os.kill(os.getpid(), signal.SIGKILL)
        states = [self.partitions[p] for p in partitions]
        self.commits.after_insert(states, mid_poll=self._mid_poll)
        for state in states:
            state.batch_applied()
