"""The fast lane on the real ClickHouse: the rows it writes are the Python path's rows, and
whatever the Python path would reject or treat specially makes ClickHouse refuse the whole
insert, leaving nothing behind (the pipeline then applies the batch in Python)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pytest

from consumer.decode.envelope import EnvelopeDecoder
from consumer.decode.registry import parse_writer_schema
from consumer.sink.server_plan import Rejected, ServerDecoder
from consumer.transform.mapping import Mapper, load_mapping

pytestmark = [pytest.mark.stack]

ENVELOPES = Path(__file__).resolve().parent / "fixtures" / "envelopes"
MAPPING = load_mapping()
IMPRESSIONS = MAPPING.for_topic("adtech.public.impressions")
PLACEHOLDER = "__debezium_unavailable_value"


def fixture(name: str) -> tuple[dict, int, bytes]:
    record = json.loads((ENVELOPES / f"{name}.json").read_text())
    return record["schema"], record["schema_id"], bytes.fromhex(record["value_hex"])


SCHEMA, SCHEMA_ID, _ = fixture("impressions_c")
WRITER = parse_writer_schema(SCHEMA)


class _Registry:
    def schema(self, schema_id: int) -> dict:
        assert schema_id == SCHEMA_ID
        return WRITER


def reencoded(value: bytes, change) -> bytes:
    """The message with its envelope changed by `change(record)`, written with its own schema."""
    record = fastavro.schemaless_reader(io.BytesIO(value[5:]), WRITER)
    change(record)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, WRITER, record)
    return value[:5] + out.getvalue()


def unchecked(value: bytes, change) -> bytes:
    """As `reencoded`, with the benchmark's encoder, which does not check decimal precision."""
    from bench.avro_codec import compile_encoder

    record = fastavro.schemaless_reader(io.BytesIO(value[5:]), WRITER)
    change(record)
    return value[:5] + compile_encoder(SCHEMA)(record)


def python_rows(values: list[bytes], offsets: list[int], partition: int) -> list[tuple]:
    decoder = EnvelopeDecoder(_Registry())
    mapper = Mapper(MAPPING)
    rows = []
    for offset, value in zip(offsets, values, strict=True):
        for row in mapper.rows(IMPRESSIONS, decoder.decode(value), tiebreak=offset):
            rows.append((*row, IMPRESSIONS.topic, partition, offset))
    return sorted(rows)


def stored(client) -> list[tuple]:
    columns = ", ".join([*IMPRESSIONS.column_names, "_topic", "_partition", "_offset"])
    rows = client.query(f"SELECT {columns} FROM {IMPRESSIONS.table}").result_rows
    # DateTime64(6, 'UTC') comes back naive; the Python path's values are aware, in UTC.
    aware = [
        tuple(v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v for v in r) for r in rows
    ]
    return sorted(aware)


def test_rows_equal_the_python_paths_and_a_retry_is_deduplicated(clickhouse) -> None:
    values = [fixture(n)[2] for n in ("impressions_c", "impressions_u", "impressions_d")]
    offsets = [100, 101, 105]
    server = ServerDecoder(clickhouse, lambda _id: WRITER, PLACEHOLDER)
    plan = server.plan(IMPRESSIONS, values[0][:5])
    assert plan is not None
    for _ in range(2):  # the same insert again, as after a lost answer: deduplicated
        server.insert(plan, [(2, offsets, values)], token="t:2:100-105:3m")
    assert stored(clickhouse) == python_rows(values, offsets, 2)
    aggregate = clickhouse.query("SELECT sum(impressions), sum(spend) FROM agg_campaign_daily").result_rows[0]
    facts = clickhouse.query(f"SELECT sum(_sign), sum(_sign * cost) FROM {IMPRESSIONS.table}").result_rows[0]
    assert tuple(aggregate) == tuple(facts)


def _set_after(field: str, value):
    def change(record: dict) -> None:
        record["after"][field] = value

    return change


POISON = {
    "snapshot read (reconciled in Python)": lambda v: fixture("impressions_r")[2],
    "trailing bytes": lambda v: v + b"\x02\x04",
    "truncated": lambda v: v[:-3],
    "TOAST placeholder in a fact": lambda v: reencoded(v, _set_after("created_at", PLACEHOLDER)),
    "timestamp not in Debezium's form": lambda v: reencoded(v, _set_after("created_at", "2026-11-27T18:01:40.5Z")),
    "timestamp outside DateTime64": lambda v: reencoded(v, _set_after("created_at", "2300-01-01T00:00:00.000000Z")),
    "invalid date": lambda v: reencoded(v, _set_after("created_at", "2026-02-30T00:00:00.000000Z")),
    # fastavro refuses to write it; Debezium never would, but a message may still say so.
    "decimal too large for Decimal(12, 6)": lambda v: unchecked(v, _set_after("cost", 10**12)),
    "truncate": lambda v: reencoded(v, lambda r: r.update(op="t", after=None)),
    "update without before-image": lambda v: reencoded(v, lambda r: r.update(op="u", before=None)),
}


@pytest.mark.parametrize("name", sorted(POISON))
def test_what_python_would_reject_makes_clickhouse_refuse_the_whole_insert(clickhouse, name) -> None:
    good = fixture("impressions_c")[2]
    poison = POISON[name](good)
    server = ServerDecoder(clickhouse, lambda _id: WRITER, PLACEHOLDER)
    plan = server.plan(IMPRESSIONS, good[:5])
    with pytest.raises(Rejected):
        server.insert(plan, [(0, [1, 2, 3], [good, poison, good])], token=f"poison-{name}")
    assert stored(clickhouse) == []
    assert clickhouse.query("SELECT count() FROM agg_campaign_daily").result_rows[0][0] == 0
