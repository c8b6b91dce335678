"""`cdc-consumer audit`: proves, from Kafka and ClickHouse alone (no Postgres), that every offset
of every change-topic partition below the group's committed position is either

* **applied exactly once**: one insert wrote rows carrying that offset, as many and with the sign
  sum its op implies (consumer.transform.fact_rules), and the table still holds them; or
* **accounted for**: a transaction marker or aborted record (offsets a read_committed reader
  never gets), a tombstone, a change that writes nothing (a logical message, a skipped truncate,
  a snapshot row of a fact ClickHouse already holds alike), or a message in the dead-letter topic
  (its `cdc.source.*` headers).

What each insert wrote per offset is in the offset ledger (clickhouse/005_offset_ledger.sql),
written by materialized views inside the inserts themselves. DESIGN.md ("The audit") gives the
argument and what it costs.

Per partition the audit keeps a checkpoint in ClickHouse: the position below which everything was
proved, and a digest (entries, rows, sign sum, offset sum) of the ledger per BUCKET offsets.
A run then

1. reads Kafka from the checkpoint to the committed position (offsets and whether the value is
   null; values are decoded only for offsets without rows and not dead-lettered), and compares
   that range offset by offset with the ledger and the table;
2. re-checks all history below the checkpoint from the aggregate projections, a few rows per
   part: the digests of the ledger and of the fact table's rows must be those stored when the
   bucket was proved. A bucket whose digests changed is proved again offset by offset (1., for
   its range), and its new digests kept if it holds.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import OffsetSpec

from consumer.kafka.client_config import KafkaClientConfig
from consumer.kafka.lag import LagReader
from consumer.kafka.source import Partition
from consumer.sink.migrate import LEDGER
from consumer.transform.fact_rules import FACT_RULES
from consumer.transform.mapping import Mapping, TableMapping

log = logging.getLogger(__name__)

BUCKET = 65_536  # offsets per digest: the projections' intDiv(_offset, 65536)
CHECKPOINTS = "_cdc_audit_checkpoints"
POSITION_ROW = 2**64 - 1  # the checkpoint row of a partition that holds only its position
LISTED = 100  # offsets listed per kind of issue and partition (the counts are complete)
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Issues that leave an offset unaccounted for, and those that count one more than once.
UNACCOUNTED = ("gap", "missing_rows")
DUPLICATED = ("duplicate", "wrong_sign_count", "unexpected_rows")


def op_patterns(role: str) -> frozenset[tuple[int, int]]:
    """The (rows, sign sum) one change may write: a dimension change one version row; a fact
    change its op's signed rows, and a snapshot row that replaces a live fact of other values
    also retracts it first (ClickHouseSink._reconcile_assertions)."""
    if role == "dimension":
        return frozenset({(1, 1)})
    patterns = {(len(rule.rows), sum(row.sign for row in rule.rows)) for rule in FACT_RULES.values()}
    return frozenset(patterns | {(2, 0)})


@dataclass(frozen=True)
class Issue:
    kind: str
    offset: int
    detail: str = ""


@dataclass
class PartitionAudit:
    topic: str
    partition: int
    table: str
    committed: int | None
    log_start: int
    audited_from: int
    applied: int = 0
    markers: int = 0
    tombstones: int = 0
    dead_lettered: int = 0
    no_change: int = 0
    counts: Counter = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)

    def add(self, kind: str, offset: int, detail: str = "") -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= LISTED:
            self.issues.append(Issue(kind, offset, detail))

    @property
    def unaccounted(self) -> int:
        return sum(self.counts[k] for k in UNACCOUNTED)

    @property
    def duplicated(self) -> int:
        return sum(self.counts[k] for k in DUPLICATED)

    @property
    def ok(self) -> bool:
        return not self.counts

    def as_dict(self) -> dict:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "table": self.table,
            "committed": self.committed,
            "log_start": self.log_start,
            "audited_from": self.audited_from,
            "applied": self.applied,
            "accounted": {
                "markers": self.markers,
                "tombstones": self.tombstones,
                "dead_lettered": self.dead_lettered,
                "no_change": self.no_change,
            },
            "unaccounted": self.unaccounted,
            "duplicated": self.duplicated,
            "issue_counts": dict(self.counts),
            "issues": [vars(i) for i in sorted(self.issues, key=lambda i: (i.offset, i.kind))],
        }


@dataclass
class AuditReport:
    group: str
    partitions: list[PartitionAudit]
    buckets_checked: int = 0
    buckets_reproved: int = 0
    messages_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.partitions)

    def as_dict(self) -> dict:
        return {
            "group": self.group,
            "ok": self.ok,
            "unaccounted": sum(p.unaccounted for p in self.partitions),
            "duplicated": sum(p.duplicated for p in self.partitions),
            "buckets_checked": self.buckets_checked,
            "buckets_reproved": self.buckets_reproved,
            "messages_read": self.messages_read,
            "seconds": round(self.seconds, 3),
            "partitions": [p.as_dict() for p in self.partitions],
        }


# -- offsets as sorted, inclusive runs ---------------------------------------------------------
Runs = list[tuple[int, int]]


def runs_of(offsets: Iterable[int]) -> Runs:
    runs: Runs = []
    for offset in offsets:
        if runs and runs[-1][1] + 1 == offset:
            runs[-1] = (runs[-1][0], offset)
        else:
            runs.append((offset, offset))
    return runs


def subtract(runs: Runs, minus: Runs) -> Iterator[int]:
    """The offsets of `runs` not in `minus` (both sorted)."""
    j = 0
    for lo, hi in runs:
        at = lo
        while at <= hi:
            while j < len(minus) and minus[j][1] < at:
                j += 1
            if j < len(minus) and minus[j][0] <= at:
                at = minus[j][1] + 1
                continue
            stop = hi if j == len(minus) else min(hi, minus[j][0] - 1)
            yield from range(at, stop + 1)
            at = stop + 1


def size(runs: Runs) -> int:
    return sum(hi - lo + 1 for lo, hi in runs)


# -- what Kafka holds ----------------------------------------------------------------------------
@dataclass
class LogRange:
    """What a read_committed reader gets of [start, stop): the offsets of records with a value,
    as runs, and how many tombstones; every other offset is a marker or an aborted record."""

    data: Runs
    tombstones: int
    read: int


class KafkaLog:
    def __init__(self, kafka: KafkaClientConfig, group: str, timeout: float = 30.0):
        self.timeout = timeout
        self.reader = Consumer(
            kafka.client(
                {
                    "group.id": f"{group}-audit",  # never joined, never committed
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": 50,  # a range ends at its last record or the log's end: no waiting
                }
            )
        )

    def close(self) -> None:
        self.reader.close()

    def messages(self, partition: Partition, start: int, stop: int) -> Iterator[Any]:
        """The records of [start, stop), in order."""
        if start >= stop:
            return
        self.reader.assign([TopicPartition(*partition, start)])
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                batch = self.reader.consume(10_000, 0.5)
                if not batch and time.monotonic() > deadline:
                    raise TimeoutError(f"{partition}: Kafka gave nothing past offset {start} for {self.timeout}s")
                for message in batch:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            return
                        raise RuntimeError(f"{partition}: {error}")
                    if message.offset() >= stop:
                        return
                    deadline = time.monotonic() + self.timeout
                    yield message
                    if message.offset() == stop - 1:
                        return
        finally:
            self.reader.unassign()

    def scan(self, partition: Partition, start: int, stop: int) -> LogRange:
        data: Runs = []
        tombstones = read = 0
        for message in self.messages(partition, start, stop):
            read += 1
            if message.value() is None:
                tombstones += 1
                continue
            offset = message.offset()
            if data and data[-1][1] + 1 == offset:
                data[-1] = (data[-1][0], offset)
            else:
                data.append((offset, offset))
        return LogRange(data, tombstones, read)

    def values(self, partition: Partition, offsets: list[int]) -> dict[int, bytes]:
        wanted = set(offsets)
        if not wanted:
            return {}
        return {
            m.offset(): m.value()
            for m in self.messages(partition, min(wanted), max(wanted) + 1)
            if m.offset() in wanted and m.value() is not None
        }

    def dead_lettered(self, dlq_topic: str) -> dict[Partition, set[int]]:
        """Source coordinates of every record of the dead-letter topic, from its headers."""
        metadata = self.reader.list_topics(dlq_topic, timeout=self.timeout).topics.get(dlq_topic)
        found: dict[Partition, set[int]] = {}
        if metadata is None or metadata.error is not None:
            return found
        for p in metadata.partitions:
            low, high = self.reader.get_watermark_offsets(TopicPartition(dlq_topic, p), timeout=self.timeout)
            for message in self.messages((dlq_topic, p), low, high):
                headers = dict(message.headers() or [])
                try:
                    source = (headers["cdc.source.topic"].decode(), int(headers["cdc.source.partition"]))
                    offset = int(headers["cdc.source.offset"])
                except (KeyError, ValueError, UnicodeDecodeError):
                    log.warning("audit: %s[%d]@%d has no source coordinates", dlq_topic, p, message.offset())
                    continue
                found.setdefault(source, set()).add(offset)
        return found


# -- what ClickHouse holds -----------------------------------------------------------------------
@dataclass(frozen=True)
class Digest:
    entries: int  # ledger rows (inserts per offset, added up); for a table: its rows
    rows: int
    sign: int
    offset_sum: int


NOTHING = Digest(0, 0, 0, 0)


@dataclass(frozen=True)
class Proved:
    """A bucket's digests when it was proved: the ledger's, and the fact table's rows (NOTHING for
    a dimension table, whose rows merges change)."""

    ledger: Digest
    table: Digest


class Ledger:
    """The offset ledger, the target tables and the audit's checkpoints in ClickHouse."""

    def __init__(self, client: Any, group: str):
        self.client = client
        self.group = group

    def _rows(self, sql: str, **parameters: Any) -> list[tuple]:
        return self.client.query(sql, parameters=parameters, settings={"join_use_nulls": 0}).result_rows

    def offsets(self, topic: str, partition: int, start: int, stop: int) -> Runs:
        """The offsets in [start, stop) the ledger has entries of, as runs."""
        rows = self._rows(
            f"""SELECT min(o), max(o) FROM (
                SELECT o, toInt64(o) - toInt64(row_number() OVER (ORDER BY o)) AS run FROM (
                    SELECT DISTINCT _offset AS o FROM {LEDGER}
                    WHERE _topic = {{t:String}} AND _partition = {{p:UInt32}} AND _offset >= {{a:UInt64}} AND _offset < {{b:UInt64}}))
            GROUP BY run ORDER BY 1""",
            t=topic,
            p=partition,
            a=start,
            b=stop,
        )
        return [(int(lo), int(hi)) for lo, hi in rows]

    def anomalies(self, table: TableMapping, partition: int, start: int, stop: int) -> list[tuple[int, ...]]:
        """(offset, ledger entries, ledger rows, ledger sign, table rows, table sign) of the offsets
        in [start, stop) whose ledger is not one insert of an op's rows, or whose rows in the table
        differ from what the ledger says was written (for a dimension: more rows than written;
        fewer is ReplacingMergeTree merging superseded versions away)."""
        name = _identifier(table.table)
        patterns = ", ".join(f"({r}, {s})" for r, s in sorted(op_patterns(table.role)))
        if table.role == "fact":
            table_sign, differs = "sum(_sign)", "t.rows != l.rows OR t.sign != l.sign"
        else:
            table_sign, differs = "count()", "t.rows > l.rows"
        where = "_topic = {t:String} AND _partition = {p:UInt32} AND _offset >= {a:UInt64} AND _offset < {b:UInt64}"
        rows = self._rows(
            f"""SELECT o, l.entries, l.rows, l.sign, t.rows, t.sign FROM
                (SELECT _offset AS o, count() AS entries, toInt64(sum(rows)) AS rows, toInt64(sum(sign)) AS sign
                 FROM {LEDGER} WHERE {where} GROUP BY o) AS l
            FULL OUTER JOIN
                (SELECT _offset AS o, toInt64(count()) AS rows, toInt64({table_sign}) AS sign
                 FROM {name} WHERE {where} GROUP BY o) AS t
            USING (o)
            WHERE l.entries != 1 OR (l.rows, l.sign) NOT IN ({patterns}) OR {differs}
            ORDER BY o""",
            t=table.topic,
            p=partition,
            a=start,
            b=stop,
        )
        return [tuple(int(v) for v in row) for row in rows]

    def live_facts(self, table: TableMapping, keys: list[int]) -> set[int]:
        """The facts among `keys` (single-column keys) that are live: sum(_sign) = 1."""
        if len(table.key) != 1 or not keys:
            return set()
        key = _identifier(table.key[0])
        rows = self._rows(
            f"SELECT {key} FROM {_identifier(table.table)} WHERE {key} IN {{k:Array(Int64)}} "
            f"GROUP BY {key} HAVING sum(_sign) = 1",
            k=keys,
        )
        return {int(r[0]) for r in rows}

    def ledger_buckets(self, topic: str) -> dict[tuple[int, int], Digest]:
        """(partition, bucket) → the ledger's digest of the bucket (from its projection)."""
        rows = self._rows(
            f"""SELECT _partition, intDiv(_offset, {BUCKET}) AS b, count(), sum(rows), sum(sign), sum(_offset * rows)
            FROM {LEDGER} WHERE _topic = {{t:String}} GROUP BY _topic, _partition, b""",
            t=topic,
        )
        return {(int(p), int(b)): Digest(int(e), int(r), int(s), int(o)) for p, b, e, r, s, o in rows}

    def table_buckets(self, table: TableMapping) -> dict[tuple[int, int], Digest]:
        """(partition, bucket) → the fact table's rows of the bucket as a ledger digest would count
        them (from its projection); `entries` is not comparable and left 0."""
        rows = self._rows(
            f"""SELECT _partition, intDiv(_offset, {BUCKET}) AS b, count(), sum(_sign), sum(_offset)
            FROM {_identifier(table.table)} WHERE _topic = {{t:String}} GROUP BY _topic, _partition, b""",
            t=table.topic,
        )
        return {(int(p), int(b)): Digest(0, int(n), int(s), int(o)) for p, b, n, s, o in rows}

    def ledger_range(self, topic: str, partition: int, start: int, stop: int) -> Digest:
        (row,) = self._rows(
            f"""SELECT count(), sum(rows), sum(sign), sum(_offset * rows) FROM {LEDGER}
            WHERE _topic = {{t:String}} AND _partition = {{p:UInt32}} AND _offset >= {{a:UInt64}} AND _offset < {{b:UInt64}}""",
            t=topic,
            p=partition,
            a=start,
            b=stop,
        )
        return Digest(*(int(v) for v in row))

    def table_range(self, table: TableMapping, partition: int, start: int, stop: int) -> Digest:
        (row,) = self._rows(
            f"""SELECT count(), sum(_sign), sum(_offset) FROM {_identifier(table.table)}
            WHERE _topic = {{t:String}} AND _partition = {{p:UInt32}} AND _offset >= {{a:UInt64}} AND _offset < {{b:UInt64}}""",
            t=table.topic,
            p=partition,
            a=start,
            b=stop,
        )
        return Digest(0, *(int(v) for v in row))

    def checkpoints(self, topic: str) -> tuple[dict[int, int], dict[tuple[int, int], Proved]]:
        """partition → audited position, and (partition, bucket) → the digests stored then."""
        rows = self._rows(
            f"""SELECT _partition, bucket, position, entries, rows, sign, offset_sum,
                table_rows, table_sign, table_offset_sum FROM {CHECKPOINTS} FINAL
            WHERE group_id = {{g:String}} AND _topic = {{t:String}}""",
            g=self.group,
            t=topic,
        )
        positions: dict[int, int] = {}
        digests: dict[tuple[int, int], Proved] = {}
        for p, bucket, position, entries, r, s, o, tr, ts, to in rows:
            if int(bucket) == POSITION_ROW:
                positions[int(p)] = int(position)
            else:
                ledger = Digest(int(entries), int(r), int(s), int(o))
                digests[(int(p), int(bucket))] = Proved(ledger, Digest(0, int(tr), int(ts), int(to)))
        return positions, digests

    def save(self, topic: str, partition: int, position: int, digests: dict[int, Proved]) -> None:
        now = datetime.now(UTC)
        rows = [
            [self.group, topic, partition, bucket, position, *astuple(d.ledger), *astuple(d.table)[1:], now]
            for bucket, d in digests.items()
        ]
        rows.append([self.group, topic, partition, POSITION_ROW, position, 0, 0, 0, 0, 0, 0, 0, now])
        self.client.insert(
            CHECKPOINTS,
            rows,
            column_names=[
                "group_id",
                "_topic",
                "_partition",
                "bucket",
                "position",
                "entries",
                "rows",
                "sign",
                "offset_sum",
                "table_rows",
                "table_sign",
                "table_offset_sum",
                "audited_at",
            ],
            settings={"async_insert": 0},
        )


def _identifier(name: str) -> str:
    if not _IDENTIFIER_RE.match(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return f"`{name}`"


# -- the audit -------------------------------------------------------------------------------------
class Auditor:
    def __init__(
        self,
        *,
        kafka: KafkaClientConfig,
        clickhouse: Any,
        mapping: Mapping,
        group: str,
        dlq_topic: str,
        decoder: Any = None,
        timeout: float = 30.0,
    ):
        self.kafka = kafka
        self.mapping = mapping
        self.group = group
        self.dlq_topic = dlq_topic
        self.decoder = decoder
        self.ledger = Ledger(clickhouse, group)
        self.timeout = timeout

    def run(self, full: bool = False) -> AuditReport:
        """One audit of every partition; `full`: from the start of every partition, ignoring the
        checkpoints (which it then writes anew)."""
        started = time.monotonic()
        lag = LagReader(self.kafka, self.group, timeout=self.timeout)
        log_ = KafkaLog(self.kafka, self.group, self.timeout)
        try:
            partitions = lag.partitions(self.mapping.topics)
            # The committed positions first: everything below them is in ClickHouse before anything
            # is read there (offsets are committed only after their insert returned).
            committed = lag.committed(partitions)
            starts = lag.offsets(partitions, OffsetSpec.earliest())
            dead = log_.dead_lettered(self.dlq_topic)
            report = AuditReport(self.group, [])
            for topic in self.mapping.topics:
                mine = [p for t, p in partitions if t == topic]
                if mine:
                    self._topic(report, log_, self.mapping.for_topic(topic), mine, committed, starts, dead, full)
        finally:
            log_.close()
            lag.close()
        report.seconds = time.monotonic() - started
        return report

    def _topic(self, report, log_, table, partitions, committed, starts, dead, full) -> None:
        positions, stored = ({}, {}) if full else self.ledger.checkpoints(table.topic)
        ledger_now = self.ledger.ledger_buckets(table.topic)
        table_now = self.ledger.table_buckets(table) if table.role == "fact" else {}
        for p in partitions:
            done = committed.get((table.topic, p)) or 0
            position = min(positions.get(p, 0), done)
            audit = PartitionAudit(
                table.topic, p, table.table, committed.get((table.topic, p)), starts[(table.topic, p)], position
            )
            report.partitions.append(audit)
            context = (log_, table, p, audit, dead.get((table.topic, p), set()), starts[(table.topic, p)])
            # History below the checkpoint: whole buckets from the projections, the last part exactly.
            reproved: dict[int, Proved] = {}
            for bucket in range(position // BUCKET + (position % BUCKET > 0)):
                lo, hi = bucket * BUCKET, min((bucket + 1) * BUCKET, position)
                now = self._digests(table, p, lo, hi, ledger_now, table_now)
                report.buckets_checked += 1
                if stored.get((p, bucket)) == now:
                    continue
                report.buckets_reproved += 1
                before = audit.counts.total()
                report.messages_read += self._prove(*context, lo, hi, history=True)
                if audit.counts.total() == before:
                    reproved[bucket] = now
            # New: from the checkpoint to the committed position, offset by offset.
            report.messages_read += self._prove(*context, position, done)
            if audit.ok and (done > position or reproved or p not in positions):
                digests = dict(reproved)
                for bucket in range(position // BUCKET, done // BUCKET + (done % BUCKET > 0)):
                    lo, hi = bucket * BUCKET, min((bucket + 1) * BUCKET, done)
                    digests[bucket] = self._digests(table, p, lo, hi, ledger_now, table_now)
                self.ledger.save(table.topic, p, done, digests)

    def _digests(self, table, p, lo, hi, ledger_now, table_now) -> Proved:
        """The digests of [lo, hi) of a partition: a whole bucket's from the projections, a part's
        by reading that range."""
        fact = table.role == "fact"
        if hi - lo == BUCKET:
            bucket = lo // BUCKET
            return Proved(ledger_now.get((p, bucket), NOTHING), table_now.get((p, bucket), NOTHING))
        ledger = self.ledger.ledger_range(table.topic, p, lo, hi)
        return Proved(ledger, self.ledger.table_range(table, p, lo, hi) if fact else NOTHING)

    def _prove(self, log_, table, p, audit, dead, log_start, start, stop, history=False) -> int:
        """Every offset of [start, stop) applied once or accounted for; returns the messages read."""
        if start >= stop:
            return 0
        topic = table.topic
        applied = self.ledger.offsets(topic, p, start, stop)
        for offset, entries, rows, sign, table_rows, table_sign in self.ledger.anomalies(table, p, start, stop):
            self._anomaly(audit, table, offset, entries, rows, sign, table_rows, table_sign)
        kafka_start = max(start, log_start)
        if kafka_start >= stop:
            return 0  # older than what Kafka keeps: only the ledger and the rows can be compared
        scan = log_.scan((topic, p), kafka_start, stop)
        for offset in subtract(_clip(applied, kafka_start), scan.data):
            audit.add("unexpected_rows", offset, "rows for an offset that holds no change (a marker or a tombstone)")
        missing = [o for o in subtract(scan.data, applied) if o not in dead]
        dead_here = sum(1 for o in dead if kafka_start <= o < stop and o not in _Runs(applied))
        no_change = self._no_change(log_, table, p, missing)
        for offset in missing:
            if offset not in no_change:
                audit.add("gap", offset, "a change neither in ClickHouse nor in the dead-letter topic")
        if not history:
            applied_here = size(_clip(applied, kafka_start))
            audit.applied += applied_here
            audit.tombstones += scan.tombstones
            audit.markers += (stop - kafka_start) - scan.read
            audit.dead_lettered += dead_here
            audit.no_change += len(no_change)
        return scan.read

    def _anomaly(self, audit, table, offset, entries, rows, sign, table_rows, table_sign) -> None:
        """An offset whose ledger or rows the SQL found irregular, classified. Applied once means:
        every insert of it wrote one op's rows, and the fact table holds exactly one insert's
        (several inserts happen when its rows were removed and a replay wrote them again)."""
        if entries == 0:
            audit.add("unexpected_rows", offset, f"{table_rows} row(s) that no insert of the consumer wrote")
            return
        patterns = op_patterns(table.role)
        each = (rows // entries, sign // entries) if rows % entries == 0 and sign % entries == 0 else None
        if each not in patterns:
            if any(rows == k * r and sign == k * s for r, s in patterns for k in range(2, rows + 1)):
                audit.add("duplicate", offset, f"one insert wrote its change's rows more than once: {rows} row(s)")
            else:
                audit.add("wrong_sign_count", offset, f"{rows} row(s) with sign sum {sign} in {entries} insert(s)")
            return
        once_rows, once_sign = each
        if table.role == "dimension":  # fewer rows than written: superseded versions merged away
            if table_rows > once_rows:
                audit.add("duplicate", offset, f"{table_rows} version rows in {table.table}, one insert writes 1")
        elif table_rows > once_rows:
            audit.add("duplicate", offset, f"{table_rows} row(s) in {table.table}, one insert writes {once_rows}")
        elif table_rows < once_rows:
            audit.add("missing_rows", offset, f"{once_rows - table_rows} of the {once_rows} row(s) written are gone")
        elif table_sign != once_sign:
            audit.add("wrong_sign_count", offset, f"the rows' sign sum is {table_sign}, {once_sign} written")

    def _no_change(self, log_, table, p, offsets: list[int]) -> set[int]:
        """Offsets among `offsets` whose change writes nothing: a logical message, a truncate
        (skipped by `truncate_action`, else dead-lettered), or a snapshot row of a fact ClickHouse
        already holds with those values."""
        if not offsets or self.decoder is None:
            return set()
        found: set[int] = set()
        snapshots: dict[int, int] = {}  # key → offset
        for offset, value in log_.values((table.topic, p), offsets).items():
            try:
                event = self.decoder.decode(value)
            except Exception as exc:
                log.info("audit: %s[%d]@%d does not decode: %s", table.topic, p, offset, exc)
                continue
            if event is None or event.op == "t":
                found.add(offset)
            elif event.op == "r" and table.role == "fact" and event.after and len(table.key) == 1:
                key = event.after.get(table.key[0])
                if isinstance(key, int):
                    snapshots[key] = offset
        live = self.ledger.live_facts(table, sorted(snapshots))
        found.update(offset for key, offset in snapshots.items() if key in live)
        return found


class _Runs:
    def __init__(self, runs: Runs):
        self.runs = runs

    def __contains__(self, offset: int) -> bool:
        return any(lo <= offset <= hi for lo, hi in self.runs)


def _clip(runs: Runs, start: int) -> Runs:
    return [(max(lo, start), hi) for lo, hi in runs if hi >= start]


# -- as a service ------------------------------------------------------------------------------------
def serve_audit(auditor: Auditor, port: int, interval: float, bind_address: str) -> None:
    """`cdc-consumer audit --serve PORT`: an audit every `interval` seconds, its result as gauges."""
    import signal

    from consumer.ops import metrics
    from consumer.ops.http import OperationsServer

    families = metrics.audit_metrics()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = OperationsServer(port, registry=families.registry, addr=bind_address).start()
    log.info("audit of group %s every %.0fs, metrics on port %d", auditor.group, interval, server.port)
    try:
        while not stop.is_set():
            try:
                report = auditor.run()
            except Exception as exc:
                log.warning("audit failed: %s", exc)
                families.failures.inc()
            else:
                for item in report.partitions:
                    labels = (item.topic, str(item.partition))
                    families.unaccounted.labels(*labels).set(item.unaccounted)
                    families.duplicated.labels(*labels).set(item.duplicated)
                families.last_success.set_to_current_time()
                families.seconds.set(report.seconds)
            stop.wait(interval)
    finally:
        server.stop()
