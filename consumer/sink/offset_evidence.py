"""What ClickHouse holds per Kafka offset, for `cdc-consumer audit` (consumer/ops/audit.py): the
offsets a target table has rows of, the offsets whose rows are not what one change writes, per
bucket of BUCKET offsets a digest from the fact tables' aggregate projection
(clickhouse/005_offset_audit.sql), and the audit's checkpoints. Knows tables and the three
coordinate columns; nothing of Kafka beyond them. Reads the names readers use, so on a cluster the
Distributed tables answer for every shard."""

from __future__ import annotations

from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from typing import Any

from consumer.core.identifiers import quote
from consumer.core.offsets import Runs
from consumer.sink.clickhouse import key_conditions
from consumer.transform.fact_rules import FACT_RULES
from consumer.transform.mapping import TableMapping

BUCKET = 65_536  # offsets per digest: the projection's intDiv(_offset, 65536)
CHECKPOINTS = "_cdc_audit_checkpoints"
POSITION_ROW = 2**64 - 1  # the checkpoint row of a partition that holds only its position
# A snapshot row of a fact ClickHouse holds with other values retracts that image first
# (ClickHouseSink._reconcile_assertions): two rows, sign sum 0.
RECONCILED = (2, 0)


def op_rows(op: str) -> frozenset[tuple[int, int]]:
    """The (rows, sign sum) one fact change of this op may leave in its table."""
    rule = FACT_RULES.get(op)
    if rule is None:
        return frozenset({(0, 0)})
    written = (len(rule.rows), sum(row.sign for row in rule.rows))
    return frozenset({written, RECONCILED}) if op == "r" else frozenset({written})


def op_patterns(role: str) -> frozenset[tuple[int, int]]:
    """The (rows, sign sum) one change of a table of this role may leave at its offset: a
    dimension change one version row; a fact change its op's signed rows."""
    if role == "dimension":
        return frozenset({(1, 1)})
    return frozenset().union(*(op_rows(op) for op in FACT_RULES))


@dataclass(frozen=True)
class Digest:
    rows: int
    sign: int
    offset_sum: int


NOTHING = Digest(0, 0, 0)


class OffsetEvidence:
    """The target tables and the audit's checkpoints in ClickHouse, per consumer group."""

    def __init__(self, client: Any, group: str):
        self.client = client
        self.group = group

    def _rows(self, sql: str, **parameters: Any) -> list[tuple]:
        return self.client.query(sql, parameters=parameters).result_rows

    @staticmethod
    def _range() -> str:
        return "_topic = {t:String} AND _partition = {p:UInt32} AND _offset >= {a:UInt64} AND _offset < {b:UInt64}"

    def applied(self, table: TableMapping, partition: int, start: int, stop: int) -> Runs:
        """The offsets in [start, stop) the table holds rows of, as runs."""
        rows = self._rows(
            f"""SELECT min(o), max(o) FROM (
                SELECT o, toInt64(o) - toInt64(row_number() OVER (ORDER BY o)) AS run FROM (
                    SELECT DISTINCT _offset AS o FROM {quote(table.table)} WHERE {self._range()}))
            GROUP BY run ORDER BY 1""",
            t=table.topic,
            p=partition,
            a=start,
            b=stop,
        )
        return [(int(lo), int(hi)) for lo, hi in rows]

    def per_offset(
        self, table: TableMapping, partition: int, start: int, stop: int, *, irregular_only: bool
    ) -> dict[int, tuple[int, int]]:
        """offset → (rows, sign sum) the table holds for it in [start, stop); `irregular_only`:
        only the offsets whose rows no single change writes (a dimension row counts +1)."""
        sign = "sum(_sign)" if table.role == "fact" else "count()"
        patterns = ", ".join(f"({r}, {s})" for r, s in sorted(op_patterns(table.role)))
        having = f"HAVING (rows, sign) NOT IN ({patterns})" if irregular_only else ""
        rows = self._rows(
            f"""SELECT _offset, toInt64(count()) AS rows, toInt64({sign}) AS sign FROM {quote(table.table)}
            WHERE {self._range()} GROUP BY _offset {having}""",
            t=table.topic,
            p=partition,
            a=start,
            b=stop,
        )
        return {int(o): (int(r), int(s)) for o, r, s in rows}

    def live_facts(self, table: TableMapping, keys: set[tuple]) -> set[tuple]:
        """The facts among `keys` that are live (sum of signs 1)."""
        return {key for key, (_, sign) in self._by_key(table, keys, "sum(_sign)").items() if sign == 1}

    def newest_offsets(self, table: TableMapping, keys: set[tuple]) -> dict[tuple, int]:
        """key → the highest offset of the table's rows of it (a dimension's latest version)."""
        return {key: offset for key, (offset, _) in self._by_key(table, keys, "0").items()}

    def _by_key(self, table: TableMapping, keys: set[tuple], aggregate: str) -> dict[tuple, tuple[int, int]]:
        width = len(table.key)
        key_list = ", ".join(map(quote, table.key))
        found: dict[tuple, tuple[int, int]] = {}
        for condition, parameters in key_conditions(table, keys):
            result = self.client.query(
                f"SELECT {key_list}, max(_offset), {aggregate} FROM {quote(table.table)} "
                f"WHERE {condition} GROUP BY {key_list}",
                parameters=parameters,
            )
            for record in result.result_rows:
                found[tuple(record[:width])] = (int(record[width]), int(record[width + 1]))
        return found

    def buckets(self, table: TableMapping) -> dict[tuple[int, int], Digest]:
        """(partition, bucket) → the fact table's digest of the bucket, from its projection."""
        rows = self._rows(
            f"""SELECT _partition, intDiv(_offset, {BUCKET}) AS b, count(), sum(_sign), sum(_offset)
            FROM {quote(table.table)} WHERE _topic = {{t:String}} GROUP BY _topic, _partition, b""",
            t=table.topic,
        )
        return {(int(p), int(b)): Digest(int(n), int(s), int(o)) for p, b, n, s, o in rows}

    def range_digest(self, table: TableMapping, partition: int, start: int, stop: int) -> Digest:
        (row,) = self._rows(
            f"SELECT count(), sum(_sign), sum(_offset) FROM {quote(table.table)} WHERE {self._range()}",
            t=table.topic,
            p=partition,
            a=start,
            b=stop,
        )
        return Digest(*(int(v) for v in row))

    def checkpoints(self, topic: str) -> tuple[dict[int, int], dict[tuple[int, int], Digest]]:
        """partition → audited position, and (partition, bucket) → the digest stored then."""
        rows = self._rows(
            f"""SELECT _partition, bucket, position, rows, sign, offset_sum FROM {CHECKPOINTS} FINAL
            WHERE group_id = {{g:String}} AND _topic = {{t:String}}""",
            g=self.group,
            t=topic,
        )
        positions: dict[int, int] = {}
        digests: dict[tuple[int, int], Digest] = {}
        for p, bucket, position, r, s, o in rows:
            if int(bucket) == POSITION_ROW:
                positions[int(p)] = int(position)
            else:
                digests[(int(p), int(bucket))] = Digest(int(r), int(s), int(o))
        return positions, digests

    def save(self, topic: str, partition: int, position: int, digests: dict[int, Digest]) -> None:
        now = datetime.now(UTC)
        rows = [[self.group, topic, partition, bucket, position, *astuple(d), now] for bucket, d in digests.items()]
        rows.append([self.group, topic, partition, POSITION_ROW, position, *astuple(NOTHING), now])
        self.client.insert(
            CHECKPOINTS,
            rows,
            column_names=[
                "group_id",
                "_topic",
                "_partition",
                "bucket",
                "position",
                "rows",
                "sign",
                "offset_sum",
                "audited_at",
            ],
            # On a cluster the next audit reads them back through the Distributed table.
            settings={"async_insert": 0, "distributed_foreground_insert": 1},
        )
