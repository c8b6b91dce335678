"""BATCH stage: rows accumulate per topic-partition until a size or age limit says flush.

A batch also remembers the last offset it consumed, rows or not (a tombstone yields no row
but must still be committed), and the Postgres commit times of its changes for latency.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

from consumer.transform.mapping import TableMapping


@dataclass(frozen=True)
class BatchPolicy:
    """When a partition's batch is written. Under load: at whichever of rows, bytes or age comes
    first, so that catching up writes few, large parts. Caught up (a poll brought less than it
    asked for: nothing more is waiting), a batch is written at once, so latency is one insert
    rather than the batch age; but a table gets at most one insert per `min_insert_interval_s`,
    which bounds the parts a trickle of changes makes."""

    max_rows: int = 200_000
    max_bytes: int = 64 * 2**20
    max_age_s: float = 0.5
    flush_when_caught_up: bool = True
    min_insert_interval_s: float = 0.2


@dataclass
class PartitionBatch:
    table: TableMapping
    topic: str
    partition: int
    # The fast lane (consumer.sink.server_plan): message values ClickHouse decodes itself, with
    # their offsets, while the batch holds no rows. Either raw values or rows, never both.
    raw_offsets: list[int] = field(default_factory=list)
    raw_values: list[bytes] = field(default_factory=list)
    raw_keys: list[bytes | None] = field(default_factory=list)  # for the dead-letter topic
    plan: Any = None  # the ServerPlan of the raw values
    rows: list[tuple] = field(default_factory=list)
    first_row_offset: int | None = None
    last_row_offset: int | None = None
    last_offset: int | None = None
    bytes: int = 0
    messages: int = 0
    started_at: float = 0.0
    commit_ts_ms: list[int] = field(default_factory=list)
    # Indexes of rows that assert a state ("this fact exists, like so") rather than a change:
    # snapshot rows, which Debezium re-emits when an interrupted snapshot starts over.
    assertions: set[int] = field(default_factory=set)
    # The messages whose rows the batch holds, by offset: what the dead-letter topic gets when
    # ClickHouse refuses one of them (bounded with the batch by max_bytes).
    sources: dict[int, tuple[bytes | None, bytes | None]] = field(default_factory=dict)

    def add(
        self,
        offset: int,
        rows: list[tuple],
        size: int,
        commit_ts_ms: int | None,
        assertion: bool = False,
        source: tuple[bytes | None, bytes | None] = (None, None),
    ) -> None:
        if self.messages == 0:
            self.started_at = time.monotonic()
        self.messages += 1
        self.last_offset = offset
        self.bytes += size
        if rows:
            if assertion:
                self.assertions.update(range(len(self.rows), len(self.rows) + len(rows)))
            # The Kafka coordinates go into every row: they are the applied watermark.
            self.rows.extend((*row, self.topic, self.partition, offset) for row in rows)
            self.sources[offset] = source
            if self.first_row_offset is None:
                self.first_row_offset = offset
            self.last_row_offset = offset
            if commit_ts_ms is not None:
                self.commit_ts_ms.append(commit_ts_ms)

    def skip(self, offset: int) -> None:
        """A message already applied (at or below the watermark): only its offset moves on."""
        if self.messages == 0:
            self.started_at = time.monotonic()
        self.messages += 1
        self.last_offset = offset

    def ready(self, policy: BatchPolicy, now: float | None = None) -> bool:
        if self.messages == 0:
            return False
        if len(self.rows) + len(self.raw_values) >= policy.max_rows or self.bytes >= policy.max_bytes:
            return True
        return (now if now is not None else time.monotonic()) - self.started_at >= policy.max_age_s

    def row_offsets(self) -> list[int]:
        """The offsets of the messages whose rows the batch holds, ascending."""
        return list(self.sources)

    def head(self, last: int) -> PartitionBatch:
        """The rows of the messages up to offset `last`, as a batch of their own."""
        at = self.column_names.index("_offset")
        cut = next((i for i, row in enumerate(self.rows) if row[at] > last), len(self.rows))
        head = PartitionBatch(self.table, self.topic, self.partition, rows=self.rows[:cut])
        head.assertions = {i for i in self.assertions if i < cut}
        if head.rows:
            head.first_row_offset, head.last_row_offset = head.rows[0][at], head.rows[-1][at]
        return head

    def drop_rows_through(self, last: int) -> None:
        """Forget the rows of the messages up to offset `last`: ClickHouse or the DLQ holds them."""
        cut = len(self.head(last).rows)
        del self.rows[:cut]
        self.assertions = {i - cut for i in self.assertions if i >= cut}
        for offset in [o for o in self.sources if o <= last]:
            del self.sources[offset]
        at = self.column_names.index("_offset")
        self.first_row_offset = self.rows[0][at] if self.rows else None

    @property
    def dedup_token(self) -> str:
        """Same rows from the same offsets → same token, so a retried insert is dropped by ClickHouse."""
        return f"{self.topic}:{self.partition}:{self.first_row_offset}-{self.last_row_offset}:{len(self.rows)}"

    @property
    def column_names(self) -> list[str]:
        return [*self.table.column_names, "_topic", "_partition", "_offset"]

    def add_raw(self, offset: int, value: bytes, size: int, key: bytes | None, plan: Any) -> None:
        """A message ClickHouse will decode (only while the batch holds no rows)."""
        if self.messages == 0:
            self.started_at = time.monotonic()
        self.messages += 1
        self.last_offset = offset
        self.bytes += size
        self.raw_offsets.append(offset)
        self.raw_values.append(value)
        self.raw_keys.append(key)
        self.plan = plan
        if self.first_row_offset is None:
            self.first_row_offset = offset
        self.last_row_offset = offset

    def take_raw(self) -> tuple[list[int], list[bytes]]:
        """Hand the raw messages back (to be decoded in Python and added as rows, in order)."""
        offsets, values = self.raw_offsets, self.raw_values
        self.raw_offsets, self.raw_values, self.raw_keys, self.plan = [], [], [], None
        self.first_row_offset = self.last_row_offset = None
        return offsets, values

    def drop_raw_through(self, offset: int) -> None:
        """Forget the raw messages at or below `offset`: ClickHouse holds them already."""
        kept = bisect.bisect_right(self.raw_offsets, offset)
        del self.raw_offsets[:kept], self.raw_values[:kept], self.raw_keys[:kept]
        if self.raw_offsets:
            self.first_row_offset = self.raw_offsets[0]
        else:
            self.first_row_offset = self.last_row_offset = self.plan = None

    @property
    def raw_dedup_token(self) -> str:
        """The token of the raw insert: the same messages always make the same insert."""
        return f"{self.topic}:{self.partition}:{self.first_row_offset}-{self.last_row_offset}:{len(self.raw_values)}m"
