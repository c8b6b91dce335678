"""`cdc-consumer audit`: proves, from Kafka and ClickHouse alone (no Postgres), that every offset
of every change-topic partition below the group's committed position is either

* **applied exactly once**: its table holds rows carrying that offset, as many and with the sign
  sum one change writes (consumer.transform.fact_rules; a dimension change one version row); or
* **accounted for**: a transaction marker or aborted record (offsets a read_committed reader
  never gets), a tombstone, a change that writes nothing (a logical message, a skipped truncate,
  a snapshot row of a fact ClickHouse already holds alike), a dimension version superseded by a
  later one of its key (ReplacingMergeTree merges it away), or a message in the dead-letter topic
  (its `cdc.source.*` headers).

Everything comes from the rows themselves: each carries its change's topic, partition, offset and
sign. Nothing is written beside the inserts (clickhouse/005_offset_audit.sql says why).

Per partition the audit keeps a checkpoint in ClickHouse: the position below which everything was
proved, and for a fact table the digest (rows, sign sum, offset sum) of each bucket of BUCKET
offsets below it. A run then

1. reads Kafka from the checkpoint to the committed position without decoding (which offsets
   hold a value), and compares that range with the rows: every offset with a value must have
   rows, and no offset may hold rows no single change writes. Values are decoded only for the
   offsets without rows that are not dead-lettered, to find the ones that write nothing;
2. re-checks all fact history below the checkpoint from the aggregate projection, a few rows per
   part: each bucket's digest must be the one stored when it was proved. A bucket whose digest
   changed is proved again exactly, each offset against its own decoded op, so a row removed from
   an update's pair is named too. Kafka may no longer hold it: then the change is reported for
   the bucket as a whole.

Dimension history is not re-checked: merges change a dimension table's rows by design.
DESIGN.md ("The audit") gives the argument and bench/README.md what it costs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka.admin import OffsetSpec

from consumer.app.clients import clickhouse_client, schema_registry
from consumer.core.errors import Poison
from consumer.core.offsets import Runs, runs_of, size, subtract
from consumer.core.secrets import redact_secrets
from consumer.decode.envelope import EnvelopeDecoder
from consumer.kafka.client_config import KafkaClientConfig, kafka_client_config
from consumer.kafka.lag import LagReader
from consumer.kafka.log_scan import KafkaLog, LogCursor
from consumer.settings import Settings
from consumer.sink.clickhouse import AppliedOffsets
from consumer.sink.offset_evidence import BUCKET, Digest, OffsetEvidence, op_patterns, op_rows
from consumer.transform.mapping import Mapper, Mapping, TableMapping, load_mapping

log = logging.getLogger(__name__)

LISTED = 100  # offsets listed per kind of issue and partition (the counts are complete)

# Issues that leave an offset unaccounted for, and those that count one more than once.
UNACCOUNTED = ("gap", "missing_rows", "changed_after_audit")
# Offsets checked at a time in a new range: what the audit holds (keys, runs) stays within one
# window however long the range; a bucket's width, like the re-check of changed history.
WINDOW = BUCKET
GAP = "a change neither in ClickHouse nor in the dead-letter topic"
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
    superseded: int = 0
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
    def accounted(self) -> int:
        return self.markers + self.tombstones + self.dead_lettered + self.no_change + self.superseded

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
                "superseded": self.superseded,
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


@dataclass
class _Scope:
    """One partition under audit: where to read it and what is known of it already."""

    log: KafkaLog
    table: TableMapping
    partition: int
    audit: PartitionAudit
    dead: set[int]

    @property
    def coordinates(self) -> tuple[str, int]:
        return self.table.topic, self.partition


class Auditor:
    def __init__(
        self,
        *,
        kafka: KafkaClientConfig,
        clickhouse: Any,
        mapping: Mapping,
        group: str,
        dlq_topic: str,
        decoder: Any,
        timeout: float = 30.0,
    ):
        self.kafka = kafka
        self.mapping = mapping
        self.mapper = Mapper(mapping, truncate_action="skip")
        self.group = group
        self.dlq_topic = dlq_topic
        self.decoder = decoder
        self.evidence = OffsetEvidence(clickhouse, group)
        self.timeout = timeout

    def run(self, full: bool = False) -> AuditReport:
        """One audit of every partition; `full`: from the start of every partition, ignoring the
        checkpoints (which it then writes anew)."""
        started = time.monotonic()
        lag = LagReader(self.kafka, self.group, timeout=self.timeout)
        kafka_log = KafkaLog(self.kafka, self.group, self.timeout)
        try:
            partitions = lag.partitions(self.mapping.topics)
            # The committed positions first: everything below them is in ClickHouse before anything
            # is read there (offsets are committed only after their insert returned).
            committed = lag.committed(partitions)
            starts = lag.offsets(partitions, OffsetSpec.earliest())
            dead = kafka_log.dead_lettered(self.dlq_topic)
            report = AuditReport(self.group, [])
            for table in self.mapping.tables:
                positions, stored = ({}, {}) if full else self.evidence.checkpoints(table.topic)
                digests_now = self.evidence.buckets(table) if table.role == "fact" else {}
                for topic, p in partitions:
                    if topic != table.topic:
                        continue
                    audit = PartitionAudit(
                        topic, p, table.table, committed.get((topic, p)), starts[(topic, p)], positions.get(p, 0)
                    )
                    report.partitions.append(audit)
                    scope = _Scope(kafka_log, table, p, audit, dead.get((topic, p), set()))
                    self._partition(report, scope, p in positions, stored, digests_now)
        finally:
            kafka_log.close()
            lag.close()
        report.seconds = time.monotonic() - started
        return report

    def _partition(self, report: AuditReport, scope: _Scope, checkpointed: bool, stored, digests_now) -> None:
        audit, p = scope.audit, scope.partition
        done = audit.committed or 0
        position = min(audit.audited_from, done)
        reproved: dict[int, Digest] = {}
        if scope.table.role == "fact":
            for bucket in range(-(-position // BUCKET)):
                lo, hi = bucket * BUCKET, min((bucket + 1) * BUCKET, position)
                now = self._digest(scope, lo, hi, digests_now)
                report.buckets_checked += 1
                if stored.get((p, bucket)) == now:
                    continue
                report.buckets_reproved += 1
                before = audit.counts.total()
                report.messages_read += self._prove_again(scope, lo, hi, stored.get((p, bucket)), now)
                if audit.counts.total() == before:
                    reproved[bucket] = now
        report.messages_read += self._prove(scope, position, done)
        if audit.ok and (done > position or reproved or not checkpointed):
            digests = dict(reproved)
            if scope.table.role == "fact":
                for bucket in range(position // BUCKET, -(-done // BUCKET)):
                    lo, hi = bucket * BUCKET, min((bucket + 1) * BUCKET, done)
                    digests[bucket] = self._digest(scope, lo, hi, digests_now)
            self.evidence.save(scope.table.topic, p, done, digests)

    def _digest(self, scope: _Scope, lo: int, hi: int, digests_now: dict) -> Digest:
        """The digest of [lo, hi): a whole bucket's from the projection, a part's by reading it."""
        if hi - lo == BUCKET:
            return digests_now.get((scope.partition, lo // BUCKET), Digest(0, 0, 0))
        return self.evidence.range_digest(scope.table, scope.partition, lo, hi)

    # -- a new range: rows for every value, nothing irregular ----------------------------------------
    def _prove(self, scope: _Scope, start: int, stop: int) -> int:
        """Every offset of [start, stop) applied once or accounted for; returns the messages read.
        Kafka is read once, and checked against ClickHouse a WINDOW of offsets at a time."""
        if start >= stop:
            return 0
        cursor = scope.log.cursor(scope.coordinates, max(start, scope.audit.log_start), stop)
        read, lo = 0, start
        try:
            while lo < stop:
                hi = min((lo // WINDOW + 1) * WINDOW, stop)
                read += self._prove_window(scope, cursor, lo, hi)
                lo = hi
        finally:
            cursor.close()
        return read

    def _prove_window(self, scope: _Scope, cursor: LogCursor, start: int, stop: int) -> int:
        table, audit = scope.table, scope.audit
        runs = self.evidence.applied(table, scope.partition, start, stop)
        for offset, held in self.evidence.per_offset(table, scope.partition, start, stop, irregular_only=True).items():
            self._irregular(audit, table, offset, held)
        kafka_start = max(start, audit.log_start)
        if kafka_start >= stop:
            return 0  # older than what Kafka keeps: only the rows can be checked
        applied = AppliedOffsets(runs)
        read = 0
        keys: dict[int, tuple] = {}  # offset without rows → the key that may account for it

        def with_value() -> Iterator[int]:
            nonlocal read
            for message in cursor.below(stop):
                read += 1
                offset = message.offset()
                if message.value() is None:
                    audit.tombstones += 1
                    continue
                yield offset
                if offset in applied:
                    continue
                if offset in scope.dead:
                    audit.dead_lettered += 1
                else:
                    self._unapplied(scope, offset, message.value(), keys)

        data = runs_of(with_value())
        for offset in subtract(_clip(runs, kafka_start), data):
            audit.add("unexpected_rows", offset, "rows for an offset that holds no change (a marker or a tombstone)")
        audit.applied += size(_clip(runs, kafka_start))
        audit.markers += (stop - kafka_start) - read
        self._account_by_key(scope, keys)
        return read

    def _irregular(self, audit: PartitionAudit, table: TableMapping, offset: int, held: tuple[int, int]) -> None:
        rows, sign = held
        if any(rows == k * r and sign == k * s for r, s in op_patterns(table.role) for k in range(2, rows + 1)):
            audit.add("duplicate", offset, f"{rows} row(s) with sign sum {sign}: one change's rows more than once")
        else:
            audit.add("wrong_sign_count", offset, f"{rows} row(s) with sign sum {sign}, which no single change writes")

    def _unapplied(self, scope: _Scope, offset: int, value: bytes, keys: dict[int, tuple]) -> None:
        """An offset with a value, no rows and no dead letter: a change that writes nothing (a
        logical message, a skipped truncate), or one whose key may account for it (a snapshot row
        of a fact ClickHouse holds alike, a superseded dimension version), or a gap."""
        try:
            event = self.decoder.decode(value)
        except Poison as exc:
            scope.audit.add("gap", offset, f"a message that does not decode ({exc}), not dead-lettered")
            return
        if event is None or event.op == "t":
            scope.audit.no_change += 1
            return
        if scope.table.role == "dimension" or event.op == "r":
            key = self._key(scope.table, event)
            if key is not None:
                keys[offset] = key
                return
        scope.audit.add("gap", offset, GAP)

    def _account_by_key(self, scope: _Scope, keys: dict[int, tuple]) -> None:
        audit = scope.audit
        if scope.table.role == "fact":
            live = self.evidence.live_facts(scope.table, set(keys.values()))
            accounted = {o for o, key in keys.items() if key in live}
            audit.no_change += len(accounted)
        else:
            newest = self.evidence.newest_offsets(scope.table, set(keys.values()))
            accounted = {o for o, key in keys.items() if newest.get(key, -1) > o}
            audit.superseded += len(accounted)
        for offset in keys.keys() - accounted:
            audit.add("gap", offset, GAP)

    def _key(self, table: TableMapping, event: Any) -> tuple | None:
        try:
            return self.mapper.key(table, event)
        except Poison:
            return None

    # -- history that changed: each offset against its own op ----------------------------------------
    def _prove_again(self, scope: _Scope, start: int, stop: int, was: Digest | None, now: Digest) -> int:
        table, audit = scope.table, scope.audit
        held = self.evidence.per_offset(table, scope.partition, start, stop, irregular_only=False)
        kafka_start = max(start, audit.log_start)
        if kafka_start >= stop:
            for offset, rows in held.items():
                if rows not in op_patterns(table.role):
                    self._irregular(audit, table, offset, rows)
            if audit.ok:
                audit.add(
                    "changed_after_audit",
                    start,
                    f"bucket {start // BUCKET} was {was}, now {now}; Kafka no longer holds it",
                )
            return 0
        read = 0
        with_value: set[int] = set()
        unchanged_snapshots: dict[int, tuple] = {}
        for message in scope.log.messages(scope.coordinates, kafka_start, stop):
            read += 1
            offset, value = message.offset(), message.value()
            if value is None:
                continue
            with_value.add(offset)
            rows = held.get(offset, (0, 0))
            if offset in scope.dead and rows == (0, 0):
                continue
            try:
                event = self.decoder.decode(value)
            except Poison as exc:
                kind = "gap" if rows == (0, 0) else "unexpected_rows"
                audit.add(
                    kind, offset, f"{rows[0]} row(s) of a message that does not decode ({exc}), not dead-lettered"
                )
                continue
            expected = op_rows(event.op) if event is not None else frozenset({(0, 0)})
            if rows in expected:
                continue
            if rows == (0, 0) and event is not None and event.op == "r":
                key = self._key(table, event)
                if key is not None:
                    unchanged_snapshots[offset] = key
                    continue
            self._wrong(audit, offset, rows, expected)
        for offset in sorted(held.keys() - with_value):
            audit.add("unexpected_rows", offset, "rows for an offset that holds no change (a marker or a tombstone)")
        live = self.evidence.live_facts(table, set(unchanged_snapshots.values()))
        for offset, key in unchanged_snapshots.items():
            if key not in live:
                self._wrong(audit, offset, (0, 0), op_rows("r"))
        return read

    def _wrong(self, audit: PartitionAudit, offset: int, rows: tuple[int, int], expected: frozenset) -> None:
        """An offset whose rows differ from what its op writes, classified."""
        count, sign = rows
        if any(count > r and count % r == 0 and sign == count // r * s for r, s in expected if r):
            audit.add("duplicate", offset, f"{count} row(s) with sign sum {sign}, its op writes {sorted(expected)}")
        elif any(count < r for r, _ in expected):
            audit.add("missing_rows", offset, f"{count} row(s) with sign sum {sign}, its op writes {sorted(expected)}")
        else:
            audit.add(
                "wrong_sign_count", offset, f"{count} row(s) with sign sum {sign}, its op writes {sorted(expected)}"
            )


def auditor_for(settings: Settings, group: str | None = None) -> Auditor:
    """The auditor of `group` (default: the configured consumer group) with the consumer's
    settings: its Kafka, ClickHouse, mapping, dead-letter topic and decoder."""
    return Auditor(
        kafka=kafka_client_config(settings),
        clickhouse=clickhouse_client(settings),
        mapping=load_mapping(settings.mapping_file, settings.topic_prefix),
        group=group or settings.group_id,
        dlq_topic=settings.dlq_topic,
        decoder=EnvelopeDecoder(schema_registry(settings)),
    )


def _clip(runs: Runs, start: int) -> Runs:
    return [(max(lo, start), hi) for lo, hi in runs if hi >= start]


# -- as a service ------------------------------------------------------------------------------------
def serve_audit(auditor: Auditor, port: int, interval: float, bind_address: str) -> None:
    """`cdc-consumer audit --serve PORT`: an audit every `interval` seconds, its result as gauges."""
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
                log.warning("audit failed: %s", redact_secrets(str(exc)))  # a client error may carry a URL
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
