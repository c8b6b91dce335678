"""The offset ledger (clickhouse/005_offset_ledger.sql) and what the audit reads beside it: per
offset, what the inserts wrote and what the target table holds; per bucket of BUCKET offsets,
digests from the aggregate projections; and the audit's checkpoints. Knows tables and the three
coordinate columns; nothing of Kafka beyond them."""

from __future__ import annotations

from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from typing import Any

from consumer.core.offsets import Runs
from consumer.sink.migrate import LEDGER
from consumer.transform.clickhouse_types import quote_identifier
from consumer.transform.fact_rules import FACT_RULES
from consumer.transform.mapping import TableMapping

BUCKET = 65_536  # offsets per digest: the projections' intDiv(_offset, 65536)
CHECKPOINTS = "_cdc_audit_checkpoints"
POSITION_ROW = 2**64 - 1  # the checkpoint row of a partition that holds only its position


def op_patterns(role: str) -> frozenset[tuple[int, int]]:
    """The (rows, sign sum) one change may write: a dimension change one version row; a fact
    change its op's signed rows, and a snapshot row that replaces a live fact of other values
    also retracts it first (ClickHouseSink._reconcile_assertions)."""
    if role == "dimension":
        return frozenset({(1, 1)})
    patterns = {(len(rule.rows), sum(row.sign for row in rule.rows)) for rule in FACT_RULES.values()}
    return frozenset(patterns | {(2, 0)})


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
        name = quote_identifier(table.table)
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
        key = quote_identifier(table.key[0])
        rows = self._rows(
            f"SELECT {key} FROM {quote_identifier(table.table)} WHERE {key} IN {{k:Array(Int64)}} "
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
            FROM {quote_identifier(table.table)} WHERE _topic = {{t:String}} GROUP BY _topic, _partition, b""",
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
            f"""SELECT count(), sum(_sign), sum(_offset) FROM {quote_identifier(table.table)}
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
