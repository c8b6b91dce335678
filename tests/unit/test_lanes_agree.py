"""The two lanes apply the same fact rules (consumer/transform/fact_rules.py), checked on an
embedded ClickHouse (chDB), no stack needed.

For every fact table and every op with a fact rule, the real Debezium message of
tests/fixtures/envelopes goes through both lanes: the Python lane (EnvelopeDecoder, then Mapper)
and the ClickHouse lane (the raw Avro bytes into a ServerPlan's staging table, whose view writes
the fact rows). Where the rule lets ClickHouse apply the op, the rows it wrote must be the Python
lane's rows; where it does not (snapshot reads), ClickHouse must refuse the whole insert and leave
the batch to Python. A message missing an image its rule needs is refused by both lanes.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

import fastavro
import pytest

from consumer.core.errors import Poison
from consumer.decode.avro_schema import strip
from consumer.decode.envelope import EnvelopeDecoder
from consumer.decode.registry import parse_writer_schema
from consumer.sink.clickhouse import connect
from consumer.sink.migrate import apply_migrations
from consumer.sink.server_plan import Rejected, ServerDecoder
from consumer.transform.fact_rules import FACT_RULES
from consumer.transform.mapping import Mapper, TableMapping, load_mapping

ENVELOPES = Path(__file__).resolve().parents[1] / "fixtures" / "envelopes"
MAPPING = load_mapping()
FACT_TABLES = [t for t in MAPPING.tables if t.role == "fact"]
PLACEHOLDER = "__debezium_unavailable_value"
REFUSED_CHANGE = "cdc: a change only the Python path may apply"
_partitions = count()  # every insert in its own partition, so the tests share one database


def fixture(table: TableMapping, op: str) -> tuple[dict, bytes]:
    record = json.loads((ENVELOPES / f"{table.expected_table}_{op}.json").read_text())
    return parse_writer_schema(record["schema"]), bytes.fromhex(record["value_hex"])


CASES = [pytest.param(table, op, id=f"{table.table}-{op}") for table in FACT_TABLES for op in FACT_RULES]


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory):
    client = connect(None, embedded_path=tmp_path_factory.mktemp("chdb"))
    apply_migrations(client)
    yield client
    client.close()


class _Writers:
    """The registry as the lanes see it: schema id -> fastavro-parsed writer schema."""

    def __init__(self, schema_id: int, writer: dict) -> None:
        self.schema_id = schema_id
        self.writer = writer

    def schema(self, schema_id: int) -> dict:
        assert schema_id == self.schema_id
        return self.writer


def python_lane(table: TableMapping, writer: dict, value: bytes, partition: int, offset: int) -> list[tuple]:
    event = EnvelopeDecoder(_Writers(int.from_bytes(value[1:5], "big"), writer)).decode(value)
    rows = Mapper(MAPPING).rows(table, event, tiebreak=offset)
    return sorted((*row, table.topic, partition, offset) for row in rows)


def clickhouse_lane(clickhouse, table: TableMapping, writer: dict, value: bytes, partition: int, offset: int):
    """The rows ClickHouse wrote for the message; raises Rejected when it refused it."""
    server = ServerDecoder(clickhouse, lambda _schema_id: writer, PLACEHOLDER)
    plan = server.plan(table, value[:5])
    assert plan is not None, f"{table.table}: no ClickHouse plan for the fixture's writer schema"
    server.insert(plan, [(partition, [offset], [value])], token=f"lanes-agree-{partition}")
    columns = ", ".join([*table.column_names, "_topic", "_partition", "_offset"])
    rows = clickhouse.query(
        f"SELECT {columns} FROM {table.table} WHERE _partition = {{p:UInt32}}", parameters={"p": partition}
    ).result_rows
    return sorted(tuple(_aware(v) for v in row) for row in rows)


def _aware(value):
    # DateTime64(6, 'UTC') comes back naive; the Python lane's values are aware, in UTC.
    return value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value


def _stored(clickhouse, table: TableMapping, partition: int) -> int:
    return clickhouse.query(
        f"SELECT count() FROM {table.table} WHERE _partition = {{p:UInt32}}", parameters={"p": partition}
    ).result_rows[0][0]


@pytest.mark.parametrize(("table", "op"), CASES)
def test_both_lanes_write_the_same_rows_or_clickhouse_leaves_the_change_to_python(clickhouse, table, op) -> None:
    rule = FACT_RULES[op]
    writer, value = fixture(table, op)
    partition, offset = next(_partitions), 1_000
    expected = python_lane(table, writer, value, partition, offset)
    sign = table.column_names.index("_sign")
    assert sorted(row[sign] for row in expected) == sorted(signed.sign for signed in rule.rows)
    if rule.server_side:
        assert clickhouse_lane(clickhouse, table, writer, value, partition, offset) == expected
    else:
        with pytest.raises(Rejected, match=REFUSED_CHANGE):
            clickhouse_lane(clickhouse, table, writer, value, partition, offset)
        assert _stored(clickhouse, table, partition) == 0


def _without(writer: dict, value: bytes, side: str) -> bytes:
    record = fastavro.schemaless_reader(io.BytesIO(value[5:]), writer)
    record[side] = None
    out = io.BytesIO()
    fastavro.schemaless_writer(out, writer, record)
    return value[:5] + out.getvalue()


MISSING_IMAGES = [
    pytest.param(table, rule.op, side, id=f"{table.table}-{rule.op}-without-{side}")
    for table in FACT_TABLES
    for rule in FACT_RULES.values()
    if rule.server_side
    for side in sorted(rule.needs)
]


@pytest.mark.parametrize(("table", "op", "side"), MISSING_IMAGES)
def test_a_change_without_an_image_its_rule_needs_is_refused_by_both_lanes(clickhouse, table, op, side) -> None:
    writer, value = fixture(table, op)
    value = _without(writer, value, side)
    partition = next(_partitions)
    with pytest.raises(Poison):
        python_lane(table, writer, value, partition, 1)
    with pytest.raises(Rejected, match=REFUSED_CHANGE):
        clickhouse_lane(clickhouse, table, writer, value, partition, 1)
    assert _stored(clickhouse, table, partition) == 0


@pytest.mark.parametrize("table", FACT_TABLES, ids=lambda t: t.table)
def test_a_column_name_that_is_no_identifier_is_left_to_python_which_dead_letters_it(table) -> None:
    from consumer.sink.server_plan import Unsupported, compile_plan
    from consumer.transform.mapping import MappingError

    writer, value = fixture(table, "c")
    record = fastavro.schemaless_reader(io.BytesIO(value[5:]), writer)
    renamed = json.loads(json.dumps(strip(writer)).replace('"name": "id"', '"name": "id` Int8, x"', 1))
    with pytest.raises(Unsupported, match="not identifiers"):
        compile_plan(table, 1, renamed, PLACEHOLDER)
    changed = {**record, "after": {**record["after"], "a`b": 1}}
    event = EnvelopeDecoder(None).decode(json.dumps(changed, default=str).encode())
    with pytest.raises(MappingError) as error:
        Mapper(MAPPING).rows(table, event, tiebreak=1)
    assert error.value.error_class == "bad_identifier"
