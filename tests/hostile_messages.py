"""Hostile change messages of every kind issue 14 names, each with the dead-letter class it must
get. Built from real Debezium records (tests/fixtures/envelopes, decoded), shared by the fuzz suite
(tests/unit/test_fuzz_messages.py) and the live-stack scenario (tests/faults/test_hostile_stack.py).

Every message that carries a row uses an id Postgres never has (`fresh_ids`), so a hostile message
that were applied would show as a row ClickHouse has and Postgres has not.
"""

from __future__ import annotations

import copy
import io
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro

from consumer.decode.registry import parse_writer_schema

ENVELOPES = Path(__file__).parent / "fixtures" / "envelopes"
TOAST = "__debezium_unavailable_value"
# What issue 14 reproduced: these column names emptied dim_advertiser and dropped its `name`.
INJECTIONS = ("b` String, DELETE WHERE 1 --", "x` String, DROP COLUMN name --")
FRESH_IDS_FROM = 8_000_000_000_000


@dataclass(frozen=True)
class Hostile:
    kind: str
    table: str  # the source table whose change topic it goes to
    value: bytes
    error_class: str


@dataclass(frozen=True)
class Real:
    """A real Debezium message of the fixtures: its writer schema, its bytes and its record."""

    table: str
    op: str
    schema_id: int
    writer: dict
    raw_schema: str
    value: bytes
    record: dict


def real_messages() -> list[Real]:
    out = []
    for path in sorted(ENVELOPES.glob("*.json")):
        fixture = json.loads(path.read_text())
        writer = parse_writer_schema(fixture["schema"])
        value = bytes.fromhex(fixture["value_hex"])
        record = fastavro.schemaless_reader(io.BytesIO(value[5:]), writer)
        table, op = path.stem.rsplit("_", 1)
        raw = fixture["schema"] if isinstance(fixture["schema"], str) else json.dumps(fixture["schema"])
        out.append(Real(table, op, fixture["schema_id"], writer, raw, value, record))
    return out


def avro_value(schema_id: int, writer: dict, record: dict) -> bytes:
    out = io.BytesIO()
    out.write(b"\x00" + struct.pack(">I", schema_id))
    fastavro.schemaless_writer(out, writer, record)
    return out.getvalue()


def json_value(envelope: dict) -> bytes:
    """A schemaless JsonConverter value (Decimal as its exact text)."""
    return json.dumps(envelope, default=str).encode()


def schemaless(record: dict) -> dict:
    """A decoded Avro envelope as JSON-ready dicts: the fields Debezium's JSON carries."""
    return {k: record[k] for k in ("op", "before", "after", "source") if k in record}


def valid_changes(reals: list[Real], fresh_ids: Iterator[int]) -> list[tuple[str, bytes]]:
    """(table, value): every real message once as Avro and once as schemaless JSON, each with an
    id of its own (and a value for a TOASTed column, which a fresh id has no previous value for)."""
    out = []
    for real in reals:
        for encode in ("avro", "json"):
            record = with_id(real.record, next(fresh_ids))
            for side in ("before", "after"):
                image = record.get(side) or {}
                image.update({k: "filled in" for k, v in image.items() if v == TOAST})
            if encode == "avro":
                out.append((real.table, avro_value(real.schema_id, real.writer, record)))
            else:
                out.append((real.table, json_value(schemaless(record))))
    return out


def with_id(record: dict, new_id: int) -> dict:
    record = copy.deepcopy(record)
    for side in ("before", "after"):
        if record.get(side):
            record[side]["id"] = new_id
    return record


def catalogue(
    reals: list[Real],
    fresh_ids: Iterator[int],
    register: Callable[[str], int],
    *,
    max_evolved_columns: int,
    unknown_schema_id: int = 2_000_000_000,
) -> list[Hostile]:
    """At least one message of each hostile kind. `register(schema_text) -> id` puts a writer
    schema in the registry the consumer reads (for the deeply nested one)."""
    by = {(r.table, r.op): r for r in reals}
    advertiser, impression = by[("advertiser", "c")], by[("impressions", "c")]

    def change(real: Real, *, after: dict | None = None, extra: dict | None = None, **fields) -> dict:
        envelope = schemaless(with_id(real.record, next(fresh_ids)))
        envelope["after"].update(after or {})
        envelope["after"].update(extra or {})
        envelope.update(fields)
        return envelope

    def with_source(real: Real, **source) -> dict:
        envelope = change(real)
        envelope["source"] = {**envelope["source"], **source}
        return envelope

    deep = 100_000
    out = [
        Hostile(
            f"column name {INJECTIONS[0]!r}",
            "advertiser",
            json_value(change(advertiser, extra={INJECTIONS[0]: "x"})),
            "bad_identifier",
        ),
        Hostile(
            f"column name {INJECTIONS[1]!r}",
            "advertiser",
            json_value(change(advertiser, extra={INJECTIONS[1]: "x"})),
            "bad_identifier",
        ),
        Hostile("op []", "impressions", json_value(change(impression, op=[])), "unsupported_op"),
        Hostile("op {}", "advertiser", json_value(change(advertiser, op={})), "unsupported_op"),
        Hostile(
            f"JSON {deep:,} deep",
            "impressions",
            b'{"schema":' + b"[" * deep + b"]" * deep + b',"payload":' + json_value(change(impression)) + b"}",
            "too_deep",
        ),
        Hostile(
            "Connect Decimal of scale 10^12 in an embedded schema",
            "impressions",
            _embedded_decimal(change(impression), "org.apache.kafka.connect.data.Decimal", 10**12),
            "decimal_scale_out_of_range",
        ),
        Hostile(
            "VariableScaleDecimal of scale 10^12",
            "impressions",
            _embedded_decimal(change(impression), "io.debezium.data.VariableScaleDecimal", 10**12),
            "decimal_scale_out_of_range",
        ),
        Hostile(
            "writer schema 300 records deep in the registry",
            "impressions",
            b"\x00" + struct.pack(">I", register(deep_avro_schema(300))) + b"\x02",
            "too_deep",
        ),
        Hostile(
            "new column with 39 decimal places",
            "advertiser",
            json_value(change(advertiser, extra={"rate": "RATE"})).replace(b'"RATE"', b"0." + b"1" * 39),
            "decimal_scale_out_of_range",
        ),
        Hostile(
            f"{max_evolved_columns + 1} new columns",
            "advertiser",
            json_value(change(advertiser, extra={f"extra_{n}": n for n in range(max_evolved_columns + 1)})),
            "too_many_new_columns",
        ),
        Hostile(
            "id 2^63 (beyond Int64)",
            "impressions",
            json_value(change(impression, after={"campaign_id": 2**63})),
            "int_out_of_range",
        ),
        Hostile(
            "lone UTF-16 surrogate",
            "advertiser",
            json_value(change(advertiser, after={"name": "ab\ud800"})),
            "lone_surrogate",
        ),
        Hostile("source LSN 2^64", "advertiser", json_value(with_source(advertiser, lsn=2**64)), "lsn_out_of_range"),
        Hostile("source LSN -1", "advertiser", json_value(with_source(advertiser, lsn=-1)), "lsn_out_of_range"),
        Hostile(
            "timestamp in 2300",
            "impressions",
            json_value(change(impression, after={"created_at": "2300-01-01T00:00:00Z"})),
            "datetime_out_of_range",
        ),
        Hostile(
            "decimal beyond Decimal(12, 6)",
            "impressions",
            json_value(change(impression, after={"cost": "12345678.5"})),
            "decimal_out_of_range",
        ),
        Hostile(
            "unknown schema id",
            "impressions",
            b"\x00" + struct.pack(">I", unknown_schema_id) + impression.value[5:],
            "unknown_schema_id",
        ),
        Hostile(
            "invalid JSON a few KB under 10 MiB",
            "advertiser",
            b'{"op": "c", "after": {"name": "' + b"x" * (10 * 2**20 - 8 * 2**10),
            "invalid_json",
        ),
    ]
    return out


def _embedded_decimal(envelope: dict, name: str, scale: int) -> bytes:
    """The change as JsonConverter writes it with its schema, `cost` declared as a decimal of
    `name` (Connect Decimal or VariableScaleDecimal) and `scale`."""
    if name.endswith("VariableScaleDecimal"):
        cost: dict[str, Any] = {
            "type": "struct",
            "name": name,
            "optional": False,
            "fields": [{"field": "scale", "type": "int32"}, {"field": "value", "type": "bytes"}],
        }
        envelope["after"]["cost"] = {"scale": scale, "value": "AQ=="}
    else:
        cost = {"type": "bytes", "name": name, "optional": False, "parameters": {"scale": str(scale)}}
        envelope["after"]["cost"] = "AQ=="
    fields = [
        {"field": k, "type": "string" if isinstance(v, str) else "int64"}
        for k, v in envelope["after"].items()
        if k != "cost"
    ]
    row = {"type": "struct", "optional": True, "fields": [*fields, {**cost, "field": "cost"}]}
    source = {"type": "struct", "field": "source", "fields": []}
    schema = {
        "type": "struct",
        "fields": [{**row, "field": "before"}, {**row, "field": "after"}, {"type": "string", "field": "op"}, source],
    }
    return json.dumps({"schema": schema, "payload": envelope}, separators=(",", ":"), default=str).encode()


def deep_avro_schema(depth: int) -> str:
    """Records nesting `depth` records, as JSON text (json.dumps itself would recurse)."""
    opening = '{"type":"record","name":"r%d","fields":[{"name":"f","type":'
    return "".join(opening % level for level in range(depth)) + '"long"' + "}]}" * depth
