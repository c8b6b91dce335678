"""Which offsets a run applies: all of them (the service), or a range per partition (a replay).

The engine asks its bounds, never checks for a replay itself. A bounded run applies only offsets
inside its ranges, never commits past a range's end (what lies above is the live group's work),
stops reading a partition past it, and is done once every range's end is committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from consumer.kafka.source import Partition
from consumer.sink.clickhouse import AppliedOffsets, ClickHouseSink
from consumer.transform.mapping import TableMapping


class Admission(Enum):
    APPLY = "apply"
    SKIP = "skip"  # before the range: only the position moves on
    STOP = "stop"  # past the range, or a partition the run does not cover: stop reading it


@dataclass(frozen=True)
class Watermarks:
    """What ClickHouse holds of a partition when it is assigned."""

    watermark: int = -1  # every offset up to here is applied
    applied: AppliedOffsets | None = None  # besides, these offsets (bounded runs)


class Unbounded:
    """The service: every offset, committed as far as it is applied; runs until stopped."""

    token_suffix = ""
    live = True
    done = False

    def admit(self, partition: Partition, offset: int) -> Admission:
        return Admission.APPLY

    def clamp(self, partition: Partition, offset: int) -> int | None:
        return offset

    def reached(self, partition: Partition, offset: int) -> bool:
        return False

    def watermarks(
        self, sink: ClickHouseSink, table: TableMapping, topic: str, partitions: list[int]
    ) -> dict[int, Watermarks]:
        applied = sink.applied_offsets(table.table, topic)
        return {p: Watermarks(applied.get(p, -1)) for p in partitions}


@dataclass
class ReplayBounds:
    """`cdc-consumer replay`: ranges[partition] = the offsets to apply (stop exclusive)."""

    ranges: dict[Partition, range]
    # Inserts carry dedup tokens of the replay's own, so ClickHouse's insert deduplication cannot
    # mistake a re-applied batch for a retry of the original one.
    token_suffix: str = ""
    finished: set[Partition] = field(default_factory=set)
    live = False

    @property
    def done(self) -> bool:
        return all(p in self.finished for p in self.ranges)

    def admit(self, partition: Partition, offset: int) -> Admission:
        bound = self.ranges.get(partition)
        if bound is None or offset >= bound.stop:
            return Admission.STOP
        return Admission.SKIP if offset < bound.start else Admission.APPLY

    def clamp(self, partition: Partition, offset: int) -> int | None:
        """The offset to commit: never past the range; None: commit nothing."""
        bound = self.ranges.get(partition)
        return None if bound is None else min(offset, bound.stop)

    def reached(self, partition: Partition, offset: int) -> bool:
        bound = self.ranges.get(partition)
        if bound is not None and offset >= bound.stop:
            self.finished.add(partition)
        return partition in self.finished

    def watermarks(
        self, sink: ClickHouseSink, table: TableMapping, topic: str, partitions: list[int]
    ) -> dict[int, Watermarks]:
        """A replay may run beside the live consumer, whose rows lie above the range: so instead of
        the watermark it asks which offsets *inside* its range ClickHouse holds, and skips those."""
        ranges = {p: self.ranges[(topic, p)] for p in partitions if (topic, p) in self.ranges}
        for p, bound in ranges.items():
            if len(bound) == 0:
                self.finished.add((topic, p))
        present = sink.applied_in_ranges(table.table, topic, ranges, role=table.role)
        return {p: Watermarks(-1, present.get(p)) for p in partitions}


Bounds = Unbounded | ReplayBounds
