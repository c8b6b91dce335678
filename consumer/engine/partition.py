"""What the engine knows of one assigned partition, and the phase it is in.

A partition is in exactly one phase (drawn in DESIGN.md):

    ACTIVE ──insert failed──▶ BACKING_OFF ──retry due──▶ RECOVERING ──batch applied──▶ ACTIVE
       │  ──another partition's insert failed──▶ BACKING_OFF ──retry due──▶ ACTIVE
       └────message cannot be applied yet──▶ WAITING ──retry due──▶ RECOVERING ──message applied──▶ ACTIVE
    any ──bound committed (replay)──▶ FINISHED

BACKING_OFF and WAITING are paused at the source; RECOVERING reads again but is not ready until
what failed went through, so readiness does not flap between two attempts. The phase is derived
from three facts kept here (paused, consecutive insert failures, a message waiting), and changes
only through the named transitions below, each returning whether the source must pause or resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from consumer.engine.batch import PartitionBatch
from consumer.kafka.source import Partition
from consumer.sink.clickhouse import AppliedOffsets, LatestRows


class Phase(StrEnum):
    ACTIVE = "active"
    WAITING = "waiting"  # a message cannot be applied yet: registry unreachable, columns being added
    BACKING_OFF = "backing off"  # an insert failed (its own, or another's: backpressure)
    RECOVERING = "recovering"  # reading again; not ready until what failed goes through
    FINISHED = "finished"  # a bounded run committed its bound


@dataclass
class PartitionState:
    partition: Partition
    batch: PartitionBatch
    watermark: int  # highest offset whose rows ClickHouse holds; -1 when none
    committed: int = -1
    retry_at: float = 0.0
    failures: int = 0  # consecutive failed inserts of this partition's batch
    waiting: bool = False  # a message of this partition waits to be read again
    paused: bool = False
    finished: bool = False
    # Bounded runs (replay): offsets inside the range whose rows ClickHouse already holds.
    applied: AppliedOffsets | None = None
    latest: LatestRows | None = None  # dimension partitions: the rows last applied, by key
    shard: int = 0  # the ClickHouse shard that holds its rows (consumer.sink.shards)
    watermark_known: bool = True  # False: assigned while its shard did not answer; nothing applied yet
    # Counted per message, handed to Prometheus once per step (a labelled inc per message is dear).
    consumed: int = 0
    consumed_bytes: int = 0
    # Owned by the ClickHouse lane: the plan for the last Confluent header seen, and after a batch
    # ClickHouse refused, the offset from which to offer it messages again.
    fast_header: bytes = b""
    fast_plan: Any = None
    fast_table: Any = None  # the table mapping fast_plan was made for
    fast_after: int = 0
    fast_penalty: int = 0

    @property
    def phase(self) -> Phase:
        if self.finished:
            return Phase.FINISHED
        if self.paused:
            return Phase.WAITING if self.waiting and not self.failures else Phase.BACKING_OFF
        if self.failures or self.waiting:
            return Phase.RECOVERING
        return Phase.ACTIVE

    @property
    def ready(self) -> bool:
        return self.phase in (Phase.ACTIVE, Phase.FINISHED)

    # -- transitions ------------------------------------------------------------------------
    def hold(self, until: float) -> bool:
        """Pause until `until` at the earliest (backpressure). True: the source must pause it."""
        self.retry_at = max(self.retry_at, until)
        was_paused, self.paused = self.paused, True
        return not was_paused

    def insert_failed(self, until: float) -> bool:
        self.failures += 1
        return self.hold(until)

    def wait(self, until: float) -> bool:
        """A message cannot be applied yet; the engine re-reads it from its offset at `until`."""
        self.waiting = True
        return self.hold(until)

    def due(self, now: float) -> bool:
        """Paused and its retry time came. True: the source must resume it."""
        if self.paused and now >= self.retry_at:
            self.paused = False
            return True
        return False

    def message_applied(self) -> None:
        self.waiting = False

    def batch_applied(self) -> None:
        batch = self.batch
        self.failures = 0
        if batch.last_row_offset is not None:
            self.watermark = max(self.watermark, batch.last_row_offset)
        self.batch = PartitionBatch(batch.table, batch.topic, batch.partition)

    def finish(self) -> None:
        self.finished = True
