"""The ClickHouse lane: fact messages go to ClickHouse as the raw bytes Kafka gave us, and
ClickHouse decodes and maps them (consumer/sink/server_plan.py). Python's work per message is to
append it to its batch.

A batch holds either raw messages or rows, never both: a message this lane cannot take while its
batch holds raw ones sends the whole batch to the Python lane (the engine does that), so the
order of the partition's changes is kept.

Inserts in doubt: an insert that failed after it was sent may have been written. It is sent again
only as it was (the same partitions, the same messages, so the same deduplication token), since the
same messages under another token would count twice. When that is no longer possible (a partition
was revoked or lost, or a batch grew meanwhile), ClickHouse is asked what it holds: the insert was
one block, so all of it or nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from consumer.decode.envelope import EnvelopeDecoder
from consumer.engine.batch import PartitionBatch
from consumer.engine.lanes import Applied, Assignment, Failed, FlushOutcome, Rejected
from consumer.engine.partition import PartitionState
from consumer.kafka.source import Partition
from consumer.ops.metrics import server_fallbacks
from consumer.sink.server_plan import Rejected as ClickHouseRefused
from consumer.sink.server_plan import ServerDecoder
from consumer.sink.shards import Shards

log = logging.getLogger(__name__)

# Enough for the latency histogram's tail at about one insert per table and second; each sample
# is a full decode in Python, which this lane otherwise avoids.
LATENCY_SAMPLES = 64

InDoubt = list[tuple[Partition, PartitionBatch, int]]  # (partition, its batch, raw messages it had)


class ClickHouseLane:
    def __init__(
        self,
        assignment: Assignment,
        servers: list[ServerDecoder],
        shards: Shards,
        decoder: EnvelopeDecoder,
        token_suffix: str = "",
    ):
        self.assignment = assignment
        self.servers = servers  # one per shard: its plans write the shard's tables
        self.shards = shards
        self.decoder = decoder
        self.token_suffix = token_suffix
        self._in_doubt: list[InDoubt] = []
        # Inserts of different tables run side by side (consumer.engine.pipeline): their groups
        # never share a partition, but they share this list.
        self._doubts = threading.RLock()

    def offer(self, state: PartitionState, offset: int, key: bytes | None, value: bytes | None, size: int) -> bool:
        batch = state.batch
        if value is None and batch.raw_values:
            batch.skip(offset)  # a tombstone: no rows
            return True
        if not value or offset < state.fast_after:
            return False
        if state.fast_table is batch.table and value.startswith(state.fast_header):
            plan = state.fast_plan
        else:
            plan = self.servers[state.shard].plan(batch.table, bytes(value[:5]))
            if plan is not None:
                state.fast_header, state.fast_plan, state.fast_table = plan.header, plan, batch.table
        if plan is None or (batch.plan is not None and batch.plan is not plan):
            return False
        batch.add_raw(offset, value, size, key, plan)
        return True

    def refused(self, state: PartitionState) -> None:
        """ClickHouse refused this partition's batch alone: its messages go to the Python lane,
        and this lane takes the partition's messages again only after a while, longer each time."""
        server_fallbacks.labels(state.batch.table.table).inc()
        state.fast_after = state.batch.last_offset + 1 + state.fast_penalty
        state.fast_penalty = min(max(1_000, 2 * state.fast_penalty), 1_000_000)

    def flush(self, partition: Partition, alone: bool = False) -> FlushOutcome:
        """One insert of this partition's raw batch; unless `alone`, with the table's other raw
        batches of the same plan (or, after a failed insert, exactly the partitions it had)."""
        state = self.assignment.partitions[partition]
        table, topic = state.batch.table.table, state.batch.topic
        group, sent = [partition], False
        try:
            self._settle(partition)
            if not state.batch.raw_values:
                return Applied([partition])  # ClickHouse had them all: only the commit is left
            if not alone:
                group = self._group(partition)
            sent = True
            self._insert(group)
        except ClickHouseRefused as exc:
            states = [self.assignment.partitions[p] for p in group]
            applied = self.shards.sink(partition[1]).applied_offsets(table, topic)
            if any(applied.get(s.partition[1], -1) > s.watermark for s in states):
                # Rows of this insert did reach ClickHouse (a view failed after the facts were
                # written): only the same insert again, deduplicated, may complete it.
                self._doubt(group)
                return Failed(group, table, exc)
            self._forget_doubt(group)
            return Rejected(group, str(exc))
        except Exception as exc:
            if sent:
                self._doubt(group)
            return Failed(group, table, exc)
        self._forget_doubt(group)
        for member in group:
            self.assignment.partitions[member].fast_penalty = 0
        return Applied(group)

    def _group(self, partition: Partition) -> list[Partition]:
        doubt = self._doubt_of(partition)
        if doubt is not None:
            return [p for p, _, _ in doubt]
        batch = self.assignment.partitions[partition].batch
        with self._doubts:
            taken = {p for doubt in self._in_doubt for p, _, _ in doubt}
        return self.assignment.group(
            partition,
            # A plan is one shard's (its server compiled it), so a group stays on one shard.
            lambda b: b.raw_values and b.plan is batch.plan and (b.topic, b.partition) not in taken,
            len(batch.raw_values),
        )

    def _doubt(self, group: list[Partition]) -> None:
        self._forget_doubt(group)
        partitions = self.assignment.partitions
        with self._doubts:
            self._in_doubt.append([(p, partitions[p].batch, len(partitions[p].batch.raw_values)) for p in group])

    def _doubt_of(self, partition: Partition) -> InDoubt | None:
        with self._doubts:
            return next((doubt for doubt in self._in_doubt if any(p == partition for p, _, _ in doubt)), None)

    def _forget_doubt(self, group: list[Partition]) -> None:
        with self._doubts:
            self._in_doubt = [doubt for doubt in self._in_doubt if not any(p in group for p, _, _ in doubt)]

    def _settle(self, partition: Partition) -> None:
        """An insert in doubt that can no longer be sent as it was: leave in the batches only what
        ClickHouse does not hold."""
        doubt = self._doubt_of(partition)
        if doubt is None:
            return
        partitions = self.assignment.partitions
        members = [(p, b) for p, b, _ in doubt if p in partitions and partitions[p].batch is b]
        if len(members) == len(doubt) and all(len(b.raw_values) == n for _, b, n in doubt):
            return
        batch = partitions[partition].batch
        applied = self.shards.sink(batch.partition).applied_offsets(batch.table.table, batch.topic) if members else {}
        with self._doubts:
            self._in_doubt.remove(doubt)
        for p, member in members:
            watermark = applied.get(p[1], -1)
            state = partitions[p]
            if watermark > state.watermark:
                log.warning("%s[%d]: a failed insert had been written up to offset %d", *p, watermark)
                state.watermark = watermark
                member.drop_raw_through(watermark)

    def _insert(self, group: list[Partition]) -> None:
        batches = [self.assignment.partitions[p].batch for p in group]
        started = time.perf_counter()
        self.servers[self.shards.of(batches[0].partition)].insert(
            batches[0].plan,
            [(b.partition, b.raw_offsets, b.raw_values) for b in batches],
            ",".join(b.raw_dedup_token for b in batches) + self.token_suffix,
        )
        # Latency from the commit times of a few changes, evenly spread (decoding all of them in
        # Python is what this lane avoids); no list of all the values.
        count = sum(len(b.raw_values) for b in batches)
        step = max(1, count // LATENCY_SAMPLES)
        sampled = [v for b in batches for v in b.raw_values[::step]]
        self.assignment.inserted(batches[0].table.table, started, count, self._commit_times(sampled))

    def _commit_times(self, values: list[bytes]) -> Iterator[int]:
        for value in values:
            try:
                event = self.decoder.decode(value)
            except Exception:  # ClickHouse took it; Python's opinion only matters for the metric
                continue
            if event is not None and event.commit_ts_ms is not None:
                yield event.commit_ts_ms
