"""The fast lane's plan and container (consumer/sink/server_plan.py), without a server.

The container must carry each message value unchanged between two copies of its coordinates,
under a schema any Avro reader accepts; plans exist only where ClickHouse can produce exactly the
Python path's rows, and everything else stays on the Python path.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import fastavro
import pytest

from consumer.decode.registry import parse_writer_schema
from consumer.sink.server_plan import SYNC, Unsupported, compile_plan
from consumer.transform.mapping import load_mapping

ENVELOPES = Path(__file__).resolve().parents[1] / "fixtures" / "envelopes"
MAPPING = load_mapping()
IMPRESSIONS = MAPPING.for_topic("adtech.public.impressions")
CLICKS = MAPPING.for_topic("adtech.public.clicks")
CAMPAIGNS = MAPPING.for_topic("adtech.public.campaign")
PLACEHOLDER = "__debezium_unavailable_value"


def fixture(name: str) -> tuple[dict, int, bytes]:
    record = json.loads((ENVELOPES / f"{name}.json").read_text())
    return record["schema"], record["schema_id"], bytes.fromhex(record["value_hex"])


def test_container_carries_values_unchanged_between_their_coordinates() -> None:
    schema, schema_id, _ = fixture("impressions_c")
    values = [fixture(n)[2] for n in ("impressions_c", "impressions_u", "impressions_d")]
    plan = compile_plan(IMPRESSIONS, schema_id, parse_writer_schema(schema), PLACEHOLDER)
    assert all(v.startswith(plan.header) for v in values)
    payload = b"".join(plan.payload([(3, [10, 11, 4_000_000_000], values)]))
    assert payload.endswith(SYNC)
    records = list(fastavro.reader(io.BytesIO(payload)))
    assert len(records) == 3
    expected = [fastavro.schemaless_reader(io.BytesIO(v[5:]), parse_writer_schema(schema)) for v in values]
    for record, offset, want in zip(records, [10, 11, 4_000_000_000], expected, strict=True):
        key = (3 << 48 | offset).to_bytes(8, "little")
        assert record["_k"] == record["_t"] == key
        assert record["_h"] == plan.header
        assert {k: record[k] for k in ("op", "before", "after")} == {k: want[k] for k in ("op", "before", "after")}


def test_a_payload_of_several_partitions_streams_in_blocks() -> None:
    schema, schema_id, value = fixture("impressions_c")
    plan = compile_plan(IMPRESSIONS, schema_id, parse_writer_schema(schema), PLACEHOLDER)
    segments = [(0, list(range(5, 5 + 2_500)), [value] * 2_500), (7, [1, 3], [value, value])]
    chunks = list(plan.payload(segments))
    assert len(chunks) == 1 + 3 + 1, "the header, then blocks of at most BLOCK_MESSAGES per partition"
    keys = [r["_k"] for r in fastavro.reader(io.BytesIO(b"".join(chunks)))]
    assert keys == [(p << 48 | o).to_bytes(8, "little") for p, offsets, _ in segments for o in offsets]


def test_plan_maps_every_column_and_bakes_in_the_topic() -> None:
    schema, schema_id, _ = fixture("clicks_c")
    plan = compile_plan(CLICKS, schema_id, parse_writer_schema(schema), PLACEHOLDER)
    staging, view = plan.ddl
    assert "ENGINE = Null" in staging and plan.staging in staging
    assert f"TO `{CLICKS.table}`" in view
    for column in CLICKS.columns:
        assert f"AS `{column.name}`" in view
    assert "'adtech.public.clicks' AS _topic" in view
    # Snapshot reads are reconciled with what ClickHouse holds, in Python: never in the view.
    assert "op NOT IN ('c', 'u', 'd')" in view
    # The same mapping and schema always make the same staging table (shared by all consumers).
    again = compile_plan(CLICKS, schema_id, parse_writer_schema(schema), PLACEHOLDER)
    assert again.staging == plan.staging and again.ddl == plan.ddl


def test_dimensions_stay_on_the_python_path() -> None:
    schema, schema_id, _ = fixture("campaign_u")
    with pytest.raises(Unsupported, match="dimension"):
        compile_plan(CAMPAIGNS, schema_id, parse_writer_schema(schema), PLACEHOLDER)


def test_a_mapping_that_would_add_columns_stays_on_the_python_path() -> None:
    schema, schema_id, _ = fixture("impressions_c")
    narrow = replace(
        IMPRESSIONS, columns=tuple(c for c in IMPRESSIONS.columns if c.name != "cost"), extra_columns="add"
    )
    with pytest.raises(Unsupported, match="would add"):
        compile_plan(narrow, schema_id, parse_writer_schema(schema), PLACEHOLDER)


def test_a_mapped_column_missing_from_the_schema() -> None:
    schema, schema_id, _ = fixture("impressions_c")
    writer = parse_writer_schema(schema)
    from consumer.transform.clickhouse_types import converter_for
    from consumer.transform.mapping import ColumnMapping

    extra = ColumnMapping("channel", "String", "channel", *converter_for("String"))
    with pytest.raises(Unsupported, match="not in this schema"):
        compile_plan(IMPRESSIONS.with_columns([extra]), schema_id, writer, PLACEHOLDER)
    # Nullable: NULL, as the Python path does for an event written before the column existed.
    nullable = ColumnMapping("channel", "Nullable(String)", "channel", *converter_for("Nullable(String)"))
    plan = compile_plan(IMPRESSIONS.with_columns([nullable]), schema_id, writer, PLACEHOLDER)
    assert "CAST(NULL AS Nullable(String)) AS `channel`" in plan.ddl[1]
    # ... and an update or delete then lacks a complete before-image: the Python path decides.
    assert "op IN ('u', 'd')" in plan.ddl[1]


def test_coordinates_must_fit() -> None:
    schema, schema_id, value = fixture("impressions_c")
    plan = compile_plan(IMPRESSIONS, schema_id, parse_writer_schema(schema), PLACEHOLDER)
    with pytest.raises(ValueError):
        plan.payload([(1 << 16, [0], [value])])
    with pytest.raises(ValueError):
        plan.payload([(0, [1 << 48], [value])])
