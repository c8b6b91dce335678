"""The commit rule, in one place: a partition's offset is committed only after ClickHouse holds
the rows of every message below it (and, since nothing is written past a dead-lettered message
before the dead-letter topic holds it, the DLQ every poison message below it).

Nothing else commits: the source never commits on its own (`enable.auto.commit=false`), and the
lanes only report what they applied.
"""

from __future__ import annotations

import time

from consumer.engine.bounds import Bounds
from consumer.engine.partition import PartitionState
from consumer.kafka.source import KafkaSource
from consumer.ops import metrics


class CommitPolicy:
    def __init__(self, source: KafkaSource, bounds: Bounds):
        self.source = source
        self.bounds = bounds

    def after_insert(self, states: list[PartitionState], *, mid_poll: bool) -> None:
        """The states' batches are in ClickHouse: commit past them.

        The consumer's position is past any transaction marker after the last record, so a
        caught-up group shows a lag of 0 rather than 1 per transaction-ending partition. Not
        mid-poll (a schema change flushing a table's batches while the rest of a poll is still
        being handed to them): the position is then also past messages no batch holds yet, and
        committing it would lose them on a crash."""
        started = time.perf_counter()
        offsets = {}
        for state in states:
            position = None if mid_poll else self.source.position(state.partition)
            offset = self.bounds.clamp(state.partition, max(state.batch.last_offset + 1, position or 0))
            if offset is not None:
                offsets[state.partition] = offset
        self._commit(states, offsets)
        metrics.commit_seconds.observe(time.perf_counter() - started)

    def idle(self, state: PartitionState) -> None:
        """A partition with nothing batched whose position moved on (past a transaction marker,
        or past messages already applied) commits that position."""
        position = self.source.position(state.partition)
        if position is not None:
            position = self.bounds.clamp(state.partition, position)
        if position is not None and position > state.committed:
            self._commit([state], {state.partition: position})

    def _commit(self, states: list[PartitionState], offsets: dict) -> None:
        if not offsets or not self.source.commit(offsets):
            return
        for state in states:
            if state.partition in offsets:
                state.committed = offsets[state.partition]
                if self.bounds.reached(state.partition, state.committed):
                    state.finish()
