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
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka.admin import OffsetSpec

from consumer.core.offsets import Runs, size, subtract
from consumer.kafka.client_config import KafkaClientConfig
from consumer.kafka.lag import LagReader
from consumer.kafka.log_scan import KafkaLog
from consumer.sink.clickhouse import AppliedOffsets
from consumer.sink.ledger import BUCKET, NOTHING, Ledger, Proved, op_patterns
from consumer.transform.mapping import Mapping

log = logging.getLogger(__name__)

LISTED = 100  # offsets listed per kind of issue and partition (the counts are complete)

# Issues that leave an offset unaccounted for, and those that count one more than once.
UNACCOUNTED = ("gap", "missing_rows")
DUPLICATED = ("duplicate", "wrong_sign_count", "unexpected_rows")


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
        held = AppliedOffsets(applied)
        dead_here = sum(1 for o in dead if kafka_start <= o < stop and o not in held)
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
