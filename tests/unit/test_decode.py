"""Unit tests of the DECODE stage (consumer/decode/envelope.py) and the registry client (consumer/decode/registry.py).

No network beyond 127.0.0.1. Messages are built the way the real stack builds them:

* table schemas are written once, as Kafka Connect schemas in JsonConverter's JSON form;
* `avro_from_connect` turns them into the Avro schema Confluent's AvroData 7.0 registers
  (record names from the Connect name, `connect.*` properties, optional unions, named types
  written once and referenced by name afterwards);
* `avro_message` frames fastavro output in the Confluent wire format, `json_message` writes what
  JsonConverter writes (bytes as base64, with or without the embedded schema).

Reusing the helpers for captured messages: `decode_bytes(value, schemas={id: avro_schema})`
decodes raw bytes through `StaticRegistry` (the real SchemaRegistry parse path, fed from a dict),
and `test_captured_fixtures` decodes every `tests/fixtures/decode/*.bin` (see its docstring).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import pickle
import socket
import threading
import time as time_module
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fastavro
import pytest

from consumer.core.errors import DecodeError, RegistryUnavailable
from consumer.core.types import UNCHANGED_TOAST, ChangeEvent
from consumer.decode.envelope import EnvelopeDecoder
from consumer.decode.registry import MAX_RESPONSE_BYTES, SchemaRegistry, parse_writer_schema
from consumer.transform.mapping import Mapper, load_mapping

PLACEHOLDER = "__debezium_unavailable_value"
ENVELOPES = Path(__file__).resolve().parents[1] / "fixtures" / "envelopes"

# ---------------------------------------------------------------------------------------------
# Connect schemas (JsonConverter form) of a Debezium 3.x PostgreSQL envelope
# ---------------------------------------------------------------------------------------------

DECIMAL = "org.apache.kafka.connect.data.Decimal"


def col(field: str, type_: str, *, optional: bool = False, name: str | None = None, **extra: Any) -> dict:
    """One column's Connect schema, keys in JsonConverter's order."""
    schema: dict[str, Any] = {"type": type_}
    for key in ("fields", "items", "keys", "values"):
        if key in extra:
            schema[key] = extra.pop(key)
    schema["optional"] = optional
    if "default" in extra:
        schema["default"] = extra.pop("default")
    if name is not None:
        schema["name"] = name
    if "version" in extra or (name and name.startswith(("io.debezium", "org.apache"))):
        schema["version"] = extra.pop("version", 1)
    if "doc" in extra:
        schema["doc"] = extra.pop("doc")
    if "parameters" in extra:
        schema["parameters"] = extra.pop("parameters")
    assert not extra, extra
    schema["field"] = field
    return schema


def decimal_col(field: str, precision: int, scale: int, **kw: Any) -> dict:
    params = {"scale": str(scale), "connect.decimal.precision": str(precision)}
    return col(field, "bytes", name=DECIMAL, parameters=params, **kw)


def vsd_col(field: str, **kw: Any) -> dict:
    return col(
        field,
        "struct",
        name="io.debezium.data.VariableScaleDecimal",
        doc="Variable scaled decimal",
        fields=[col("scale", "int32"), col("value", "bytes")],
        **kw,
    )


SNAPSHOT_ALLOWED = "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"
SOURCE_SCHEMA = col(
    "source",
    "struct",
    name="io.debezium.connector.postgresql.Source",
    version=1,
    fields=[
        col("version", "string"),
        col("connector", "string"),
        col("name", "string"),
        col("ts_ms", "int64"),
        col(
            "snapshot",
            "string",
            optional=True,
            default="false",
            name="io.debezium.data.Enum",
            parameters={"allowed": SNAPSHOT_ALLOWED},
        ),
        col("db", "string"),
        col("sequence", "string", optional=True),
        col("ts_us", "int64", optional=True),
        col("ts_ns", "int64", optional=True),
        col("schema", "string"),
        col("table", "string"),
        col("txId", "int64", optional=True),
        col("lsn", "int64", optional=True),
        col("xmin", "int64", optional=True),
        col("origin", "string", optional=True),
        col("origin_lsn", "int64", optional=True),
    ],
)
TRANSACTION_SCHEMA = col(
    "transaction",
    "struct",
    optional=True,
    name="event.block",
    version=1,
    fields=[col("id", "string"), col("total_order", "int64"), col("data_collection_order", "int64")],
)


def envelope_schema(table: str, columns: list[dict], prefix: str = "adtech") -> dict:
    value_name = f"{prefix}.public.{table}.Value"
    before = {"type": "struct", "fields": columns, "optional": True, "name": value_name, "field": "before"}
    return {
        "type": "struct",
        "fields": [
            before,
            {**before, "field": "after"},
            SOURCE_SCHEMA,
            TRANSACTION_SCHEMA,
            col("op", "string"),
            col("ts_ms", "int64", optional=True),
            col("ts_us", "int64", optional=True),
            col("ts_ns", "int64", optional=True),
        ],
        "optional": False,
        "name": f"{prefix}.public.{table}.Envelope",
        "version": 2,
    }


# The table of the brief: id, name, amount NUMERIC(12,4) NOT NULL DEFAULT 0, created_at timestamptz,
# day date, ts timestamp(6), var NUMERIC (no scale), doc jsonb, tags text[].
ITEMS_COLUMNS = [
    col("id", "int64"),
    col("name", "string"),
    decimal_col("amount", 12, 4, default="AA=="),
    col("created_at", "string", name="io.debezium.time.ZonedTimestamp"),
    col("day", "int32", optional=True, name="io.debezium.time.Date"),
    col("ts", "int64", optional=True, name="io.debezium.time.MicroTimestamp"),
    vsd_col("var", optional=True),
    col("doc", "string", optional=True, name="io.debezium.data.Json"),
    col("tags", "array", optional=True, items={"type": "string", "optional": True}),
]
ITEMS = envelope_schema("items", ITEMS_COLUMNS)

# Every other type the connector can send, to cover each converter (and named-type reuse:
# a second VariableScaleDecimal is written by name in Avro).
KITCHEN_COLUMNS = [
    col("k", "int64"),
    col("small", "int16"),
    col("f", "float64", optional=True),
    col("flag", "boolean", optional=True),
    col("blob", "bytes", optional=True),
    decimal_col("big", 40, 10, optional=True),
    decimal_col("odd", 3, 5, optional=True),  # PostgreSQL 15+: scale > precision
    vsd_col("var2", optional=True),
    vsd_col("var3", optional=True),  # the same named type again: Avro refers to it by name
    col("ts_ms", "int64", optional=True, name="io.debezium.time.Timestamp"),
    col("ts_ns", "int64", optional=True, name="io.debezium.time.NanoTimestamp"),
    col("t_ms", "int32", optional=True, name="io.debezium.time.Time"),
    col("t_us", "int64", optional=True, name="io.debezium.time.MicroTime"),
    col("t_ns", "int64", optional=True, name="io.debezium.time.NanoTime"),
    col("t_z", "string", optional=True, name="io.debezium.time.ZonedTime"),
    col("c_date", "int32", optional=True, name="org.apache.kafka.connect.data.Date"),
    col("c_time", "int32", optional=True, name="org.apache.kafka.connect.data.Time"),
    col("c_ts", "int64", optional=True, name="org.apache.kafka.connect.data.Timestamp"),
    col("uuid", "string", optional=True, name="io.debezium.data.Uuid"),
    col("xml", "string", optional=True, name="io.debezium.data.Xml"),
    col("status", "string", optional=True, name="io.debezium.data.Enum", parameters={"allowed": "on,off"}),
    col("flags", "string", optional=True, name="io.debezium.data.EnumSet", parameters={"allowed": "a,b"}),
    col("dur", "int64", optional=True, name="io.debezium.time.MicroDuration"),
    col("ivl", "string", optional=True, name="io.debezium.time.Interval"),
    col("int_arr", "array", optional=True, items={"type": "int32", "optional": True}),
    col(
        "date_arr",
        "array",
        optional=True,
        items={"type": "int32", "optional": True, "name": "io.debezium.time.Date", "version": 1},
    ),
    col(
        "hs",
        "map",
        optional=True,
        keys={"type": "string", "optional": False},
        values={"type": "string", "optional": True},
    ),
    col(
        "geom",
        "struct",
        optional=True,
        name="io.debezium.data.geometry.Geometry",
        doc="Geometry",
        fields=[col("wkb", "bytes"), col("srid", "int32", optional=True)],
    ),
]
KITCHEN = envelope_schema("kitchen", KITCHEN_COLUMNS)

# ---------------------------------------------------------------------------------------------
# Connect schema -> Avro schema, as Confluent AvroData (connect.meta.data=true) writes it
# ---------------------------------------------------------------------------------------------

_AVRO_PRIMITIVE = {
    "int8": "int",
    "int16": "int",
    "int32": "int",
    "int64": "long",
    "float32": "float",
    "float64": "double",
    "boolean": "boolean",
    "string": "string",
    "bytes": "bytes",
}
_CONNECT_LOGICAL = {
    "org.apache.kafka.connect.data.Date": "date",
    "org.apache.kafka.connect.data.Time": "time-millis",
    "org.apache.kafka.connect.data.Timestamp": "timestamp-millis",
}


def avro_from_connect(schema: dict) -> Any:
    """Avro schema (JSON form) that AvroData.fromConnectSchema + Avro's Schema.toString produce."""
    return _avro_full(schema, set(), None)


def _split(full: str) -> tuple[str | None, str]:
    ns, _, name = full.rpartition(".")
    return ns or None, name


def _avro_default(schema: dict, value: Any) -> Any:
    if schema["type"] == "bytes":  # JSON base64 -> Avro's ISO-8859-1 string of the bytes
        return base64.b64decode(value).decode("latin-1")
    return value


def _avro_full(schema: dict, seen: set[str], ns: str | None) -> Any:
    base = _avro_base(schema, seen, ns)
    if not schema.get("optional"):
        return base
    # AvroData: optional with a default -> [T, "null"] (the default must match the first branch).
    return [base, "null"] if schema.get("default") is not None else ["null", base]


def _avro_base(schema: dict, seen: set[str], ns: str | None) -> Any:
    type_, name = schema["type"], schema.get("name")
    if type_ == "struct":
        full = name or "io.confluent.connect.avro.ConnectDefault"
        record_ns, record_name = _split(full)
        if full in seen:  # written once; later by (namespace-relative) name
            return record_name if record_ns == ns else full
        seen.add(full)
        out: dict[str, Any] = {"type": "record", "name": record_name}
        if record_ns != ns:
            out["namespace"] = record_ns
        out["fields"] = [_avro_field(f, seen, record_ns) for f in schema["fields"]]
    elif type_ in _AVRO_PRIMITIVE:
        out = {"type": _AVRO_PRIMITIVE[type_]}
        if name == DECIMAL:
            out["scale"] = int(schema["parameters"]["scale"])
            out["precision"] = int(schema["parameters"].get("connect.decimal.precision", 64))
    elif type_ == "array":
        out = {"type": "array", "items": _avro_full(schema["items"], seen, ns)}
    elif type_ == "map":
        assert schema["keys"]["type"] == "string"
        out = {"type": "map", "values": _avro_full(schema["values"], seen, ns)}
    else:
        raise AssertionError(type_)
    if "doc" in schema:
        out["connect.doc"] = schema["doc"]
    if "version" in schema:
        out["connect.version"] = schema["version"]
    if "parameters" in schema:
        out["connect.parameters"] = schema["parameters"]
    if schema.get("default") is not None:
        out["connect.default"] = _avro_default(schema, schema["default"])
    if name is not None:
        out["connect.name"] = name
    if type_ in ("int8", "int16"):
        out["connect.type"] = type_
    if name == DECIMAL:
        out["logicalType"] = "decimal"
    elif name in _CONNECT_LOGICAL:
        out["logicalType"] = _CONNECT_LOGICAL[name]
    return out["type"] if len(out) == 1 else out


def _avro_field(schema: dict, seen: set[str], ns: str | None) -> dict:
    out = {"name": schema["field"], "type": _avro_full(schema, seen, ns)}
    if schema.get("default") is not None:
        out["default"] = _avro_default(schema, schema["default"])
    elif schema.get("optional"):
        out["default"] = None
    return out


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def unscaled(value: str | Decimal, scale: int) -> bytes:
    """Big-endian two's complement of the unscaled value, minimal length (Java BigInteger)."""
    sign, digits, exponent = Decimal(value).as_tuple()
    n = int("".join(map(str, digits))) * (-1 if sign else 1)
    n = n * 10 ** (exponent + scale) if exponent + scale >= 0 else n // 10 ** -(exponent + scale)
    return n.to_bytes(max(1, (n + (n < 0)).bit_length() // 8 + 1), "big", signed=True)


def vsd(value: str) -> dict:
    d = Decimal(value)
    scale = -d.as_tuple().exponent
    return {"scale": scale, "value": unscaled(d, scale)}


def source(
    table: str, *, lsn: int | None = 123_456_789, ts_ms: int = 1_704_164_645_000, snapshot: str | None = "false"
):
    return {
        "version": "3.6.1.Final",
        "connector": "postgresql",
        "name": "adtech",
        "ts_ms": ts_ms,
        "snapshot": snapshot,
        "db": "adtech",
        "sequence": '["123456000","123456789"]',
        "ts_us": ts_ms * 1000,
        "ts_ns": ts_ms * 1_000_000,
        "schema": "public",
        "table": table,
        "txId": 777,
        "lsn": lsn,
        "xmin": None,
        "origin": None,
        "origin_lsn": None,
    }


def envelope(op: str, before: dict | None, after: dict | None, table: str = "items", **src: Any) -> dict:
    return {
        "before": before,
        "after": after,
        "source": source(table, **src),
        "transaction": None,
        "op": op,
        "ts_ms": 1_704_164_645_500,
        "ts_us": 1_704_164_645_500_000,
        "ts_ns": 1_704_164_645_500_000_000,
    }


def frame(schema_id: int, body: bytes) -> bytes:
    """Confluent wire format: magic 0x00, 4-byte big-endian schema id, Avro binary."""
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def avro_message(schema_id: int, avro_schema: Any, value: dict) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parse_writer_schema(avro_schema), value)
    return frame(schema_id, out.getvalue())


def jsonify(value: Any) -> Any:
    """Connect value -> what JsonConverter writes: bytes as base64, NaN/±Infinity as strings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: jsonify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonify(v) for v in value]
    return value


def json_message(connect_schema: dict | None, value: dict, *, with_schema: bool = True) -> bytes:
    payload = jsonify(value)
    doc = {"schema": connect_schema, "payload": payload} if with_schema else payload
    return json.dumps(doc, separators=(",", ":")).encode()


class StaticRegistry(SchemaRegistry):
    """SchemaRegistry served from a dict {id: Avro schema (dict/list/str JSON)}: the real parse and
    caching path, no HTTP. Counts fetches."""

    def __init__(self, schemas: dict[int, Any]) -> None:
        super().__init__("http://static.invalid")
        self.schemas = schemas
        self.fetches = 0

    def _get(self, path: str, what: str) -> dict[str, Any]:
        self.fetches += 1
        schema_id = int(path.rsplit("/", 1)[1])
        if schema_id not in self.schemas:
            raise DecodeError("unknown_schema_id", f"{what} not found (static registry)")
        schema = self.schemas[schema_id]
        return {"schema": schema if isinstance(schema, str) else json.dumps(schema)}


def decode_bytes(value: bytes | None, schemas: dict[int, Any] | None = None) -> ChangeEvent | None:
    """Decode raw message bytes (e.g. a captured Debezium message) with the given writer schemas."""
    return EnvelopeDecoder(StaticRegistry(schemas or {})).decode(value)


ITEMS_ID, KITCHEN_ID = 7, 8
SCHEMAS = {ITEMS_ID: avro_from_connect(ITEMS), KITCHEN_ID: avro_from_connect(KITCHEN)}
FORMATS = ("avro", "json_schema", "json_plain")


def encode(fmt: str, value: dict, table: str = "items") -> bytes:
    connect_schema, schema_id = (ITEMS, ITEMS_ID) if table == "items" else (KITCHEN, KITCHEN_ID)
    if fmt == "avro":
        return avro_message(schema_id, SCHEMAS[schema_id], value)
    return json_message(connect_schema, value, with_schema=fmt == "json_schema")


@pytest.fixture
def decoder() -> EnvelopeDecoder:
    return EnvelopeDecoder(StaticRegistry(dict(SCHEMAS)))


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------

DAY = date(2024, 1, 2)
TS = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_us(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(microseconds=1)


def items_row(**changes: Any) -> dict:
    row = {
        "id": 42,
        "name": "widget",
        "amount": unscaled("12.3400", 4),
        "created_at": "2024-01-02T03:04:05.123456Z",
        "day": (DAY - date(1970, 1, 1)).days,
        "ts": epoch_us(TS),
        "var": vsd("-123.456"),
        "doc": '{"a": 1}',
        "tags": ["x", None, "y"],
    }
    row.update(changes)
    return row


def items_key_row() -> dict:
    """`before` of a delete under REPLICA IDENTITY DEFAULT: the key, every other column null
    (the NOT NULL ones with their zero value, as Debezium fills them)."""
    return {
        "id": 42,
        "name": "",
        "amount": unscaled("0", 4),
        "created_at": "1970-01-01T00:00:00Z",
        "day": None,
        "ts": None,
        "var": None,
        "doc": None,
        "tags": None,
    }


def assert_decimal(value: Any, text: str) -> None:
    assert type(value) is Decimal
    assert str(value) == text  # same digits and the same exponent, not just numerically equal


def assert_items_after(after: dict) -> None:
    assert after["id"] == 42
    assert after["name"] == "widget"
    assert_decimal(after["amount"], "12.3400")
    assert after["created_at"] == datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert after["created_at"].tzinfo is UTC
    assert after["day"] == DAY and type(after["day"]) is date
    assert after["ts"] == TS and after["ts"].tzinfo is UTC
    assert_decimal(after["var"], "-123.456")
    assert after["doc"] == '{"a": 1}'
    assert after["tags"] == ["x", None, "y"]


# ---------------------------------------------------------------------------------------------
# The Avro schema helper itself matches what the real stack registers
# ---------------------------------------------------------------------------------------------


def test_avro_schema_has_the_shape_avrodata_registers() -> None:
    schema = SCHEMAS[ITEMS_ID]
    assert schema["type"] == "record"
    assert (schema["name"], schema["namespace"]) == ("Envelope", "adtech.public.items")
    assert schema["connect.name"] == "adtech.public.items.Envelope" and schema["connect.version"] == 2
    fields = {f["name"]: f for f in schema["fields"]}
    assert list(fields) == ["before", "after", "source", "transaction", "op", "ts_ms", "ts_us", "ts_ns"]
    value = fields["before"]["type"][1]
    assert fields["before"]["type"][0] == "null" and fields["before"]["default"] is None
    assert (value["name"], value["connect.name"]) == ("Value", "adtech.public.items.Value")
    assert "namespace" not in value  # same namespace as the Envelope
    assert fields["after"]["type"] == ["null", "Value"]  # a named type is written once
    columns = {f["name"]: f for f in value["fields"]}
    assert columns["amount"]["type"] == {
        "type": "bytes",
        "scale": 4,
        "precision": 12,
        "connect.version": 1,
        "connect.parameters": {"scale": "4", "connect.decimal.precision": "12"},
        "connect.default": "\x00",
        "connect.name": DECIMAL,
        "logicalType": "decimal",
    }
    assert columns["ts"]["type"] == [
        "null",
        {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTimestamp"},
    ]
    var = columns["var"]["type"][1]
    assert (var["name"], var["namespace"]) == ("VariableScaleDecimal", "io.debezium.data")
    src = fields["source"]["type"]
    assert src["connect.name"] == "io.debezium.connector.postgresql.Source"
    snapshot = next(f for f in src["fields"] if f["name"] == "snapshot")
    assert snapshot["type"][1] == "null" and snapshot["default"] == "false"  # optional with default: [T, null]
    kitchen = {f["name"]: f for f in SCHEMAS[KITCHEN_ID]["fields"][0]["type"][1]["fields"]}
    assert kitchen["var2"]["type"][1]["name"] == "VariableScaleDecimal"
    assert kitchen["var3"]["type"] == ["null", "io.debezium.data.VariableScaleDecimal"]
    assert kitchen["small"]["type"] == {"type": "int", "connect.type": "int16"}
    assert kitchen["c_ts"]["type"][1]["logicalType"] == "timestamp-millis"


# ---------------------------------------------------------------------------------------------
# Ops, in every format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_create(decoder: EnvelopeDecoder, fmt: str) -> None:
    event = decoder.decode(encode(fmt, envelope("c", None, items_row())))
    assert isinstance(event, ChangeEvent)
    assert (event.op, event.table, event.before, event.lsn, event.commit_ts_ms, event.snapshot) == (
        "c",
        "items",
        None,
        123_456_789,
        1_704_164_645_000,
        False,
    )
    if fmt == "json_plain":  # no schema: values as JSON gives them
        assert event.after == jsonify(items_row())
    else:
        assert_items_after(event.after)


def test_avro_and_json_with_schema_decode_identically(decoder: EnvelopeDecoder) -> None:
    for table, row in (("items", items_row()), ("kitchen", kitchen_row())):
        value = envelope("u", copy.deepcopy(row), row, table=table)
        from_avro = decoder.decode(encode("avro", copy.deepcopy(value), table))
        from_json = decoder.decode(encode("json_schema", value, table))
        assert _comparable(from_avro) == _comparable(from_json)


def _comparable(event: Any) -> Any:
    # NaN != NaN; compare its repr instead. Decimals by text (exponent included).
    def norm(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        if isinstance(v, Decimal):
            return ("decimal", str(v))
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return norm((event.op, event.table, event.before, event.after, event.lsn, event.commit_ts_ms))


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_with_default_replica_identity_has_no_before(decoder: EnvelopeDecoder, fmt: str) -> None:
    event = decoder.decode(encode(fmt, envelope("u", None, items_row(name="renamed"))))
    assert event.op == "u" and event.before is None and event.after["name"] == "renamed"


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_with_full_replica_identity_has_before(decoder: EnvelopeDecoder, fmt: str) -> None:
    event = decoder.decode(encode(fmt, envelope("u", items_row(), items_row(name="renamed"))))
    assert event.before["name"] == "widget" and event.after["name"] == "renamed"
    if fmt != "json_plain":
        assert_items_after(event.before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_delete(decoder: EnvelopeDecoder, fmt: str) -> None:
    event = decoder.decode(encode(fmt, envelope("d", items_key_row(), None)))
    assert (event.op, event.after, event.before["id"]) == ("d", None, 42)
    if fmt != "json_plain":
        assert_decimal(event.before["amount"], "0.0000")
        assert event.before["created_at"] == EPOCH


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        ("true", True),
        ("first", True),
        ("first_in_data_collection", True),
        ("last_in_data_collection", True),
        ("last", True),
        ("incremental", True),
        ("false", False),
        (None, False),
    ],
)
def test_snapshot_read(decoder: EnvelopeDecoder, fmt: str, snapshot: str | None, expected: bool) -> None:
    event = decoder.decode(encode(fmt, envelope("r", None, items_row(), snapshot=snapshot)))
    assert event.op == "r" and event.snapshot is expected and event.after["id"] == 42


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncate(decoder: EnvelopeDecoder, fmt: str) -> None:
    event = decoder.decode(encode(fmt, envelope("t", None, None, lsn=99)))
    assert event == ChangeEvent("t", "items", None, None, 99, 1_704_164_645_000, False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_lsn_is_none(decoder: EnvelopeDecoder, fmt: str) -> None:
    assert decoder.decode(encode(fmt, envelope("c", None, items_row(), lsn=None))).lsn is None


def test_tombstone_is_nothing(decoder: EnvelopeDecoder) -> None:
    assert decoder.decode(None) is None


LOGICAL_MESSAGE_AVRO = {
    "type": "record",
    "name": "Envelope",
    "namespace": "io.debezium.connector.postgresql.MessageValue",
    "fields": [
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"], "default": None},
        {"name": "source", "type": avro_from_connect(SOURCE_SCHEMA)},
        {
            "name": "message",
            "type": {
                "type": "record",
                "name": "Message",
                "fields": [{"name": "prefix", "type": "string"}, {"name": "content", "type": "bytes"}],
            },
        },
    ],
}


def test_logical_decoding_message_is_nothing(decoder: EnvelopeDecoder) -> None:
    value = {"op": "m", "ts_ms": 1, "source": source(""), "message": {"prefix": "p", "content": b"hello"}}
    assert decode_bytes(avro_message(30, LOGICAL_MESSAGE_AVRO, value), {30: LOGICAL_MESSAGE_AVRO}) is None
    assert decoder.decode(json.dumps(jsonify(value)).encode()) is None


# ---------------------------------------------------------------------------------------------
# Unchanged TOAST
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_toast_placeholder_in_string_json_and_array_columns(decoder: EnvelopeDecoder, fmt: str) -> None:
    after = items_row(name=PLACEHOLDER, doc=PLACEHOLDER, tags=[PLACEHOLDER])
    event = decoder.decode(encode(fmt, envelope("u", None, after)))
    assert event.after["name"] is UNCHANGED_TOAST
    assert event.after["doc"] is UNCHANGED_TOAST
    assert event.after["tags"] is UNCHANGED_TOAST
    assert event.after["id"] == 42


@pytest.mark.parametrize("fmt", FORMATS)
def test_toast_placeholder_in_bytes_and_number_array_columns(decoder: EnvelopeDecoder, fmt: str) -> None:
    after = kitchen_row(
        blob=PLACEHOLDER.encode(),
        int_arr=list(PLACEHOLDER.encode()),
        hs={PLACEHOLDER: PLACEHOLDER},
    )
    event = decoder.decode(encode(fmt, envelope("u", None, after, table="kitchen"), "kitchen"))
    assert event.after["blob"] is UNCHANGED_TOAST
    assert event.after["int_arr"] is UNCHANGED_TOAST
    assert event.after["hs"] is UNCHANGED_TOAST


@pytest.mark.parametrize("fmt", FORMATS)
def test_toast_placeholder_in_before_and_lookalikes_untouched(decoder: EnvelopeDecoder, fmt: str) -> None:
    before = items_row(name=PLACEHOLDER)
    after = items_row(name=PLACEHOLDER + " ", doc="__debezium_unavailable", tags=[PLACEHOLDER, "x"])
    event = decoder.decode(encode(fmt, envelope("u", before, after)))
    assert event.before["name"] is UNCHANGED_TOAST
    assert event.after["name"] == PLACEHOLDER + " "
    assert event.after["doc"] == "__debezium_unavailable"
    assert event.after["tags"] == [PLACEHOLDER, "x"]


def test_custom_placeholder() -> None:
    decoder = EnvelopeDecoder(StaticRegistry(dict(SCHEMAS)), toast_placeholder="hex:00ff")
    event = decoder.decode(
        encode("avro", envelope("u", None, kitchen_row(blob=b"\x00\xff"), table="kitchen"), "kitchen")
    )
    assert event.after["blob"] is UNCHANGED_TOAST
    decoder = EnvelopeDecoder(None, toast_placeholder="<toast>")
    event = decoder.decode(encode("json_schema", envelope("u", None, items_row(name="<toast>", doc=PLACEHOLDER))))
    assert event.after["name"] is UNCHANGED_TOAST and event.after["doc"] == PLACEHOLDER


def test_unchanged_toast_sentinel_survives_copy_and_pickle() -> None:
    assert copy.deepcopy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(UNCHANGED_TOAST)) is UNCHANGED_TOAST
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"
    assert UNCHANGED_TOAST != PLACEHOLDER


# ---------------------------------------------------------------------------------------------
# Logical types
# ---------------------------------------------------------------------------------------------


def kitchen_row(**changes: Any) -> dict:
    row = {
        "k": 1,
        "small": -7,
        "f": 1.5,
        "flag": True,
        "blob": b"\x00\x01\xfe",
        "big": unscaled("-123456789012345678901234567890.0123456789", 10),
        "odd": unscaled("0.00012", 5),
        "var2": vsd("98765432109876543210987654321.123"),
        "var3": vsd("-0.5"),
        "ts_ms": epoch_us(datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)) // 1000,
        "ts_ns": epoch_us(TS) * 1000 + 999,
        "t_ms": (3 * 3600 + 4 * 60 + 5) * 1000 + 678,
        "t_us": (23 * 3600 + 59 * 60 + 59) * 1_000_000 + 999_999,
        "t_ns": (1 * 3600) * 1_000_000_000 + 123_456_789,
        "t_z": "03:04:05.123456Z",
        "c_date": (date(1969, 12, 31) - date(1970, 1, 1)).days,
        "c_time": (12 * 3600) * 1000 + 1,
        "c_ts": -1,
        "uuid": "b5a4c0de-0000-4000-8000-000000000001",
        "xml": "<a>1</a>",
        "status": "on",
        "flags": "a,b",
        "dur": 3_600_000_000,
        "ivl": "P1Y2M3DT4H5M6.78S",
        "int_arr": [1, None, -3],
        "date_arr": [0, None, 19724],
        "hs": {"k": "v", "n": None},
        "geom": {"wkb": b"\x01\x01\x00", "srid": 4326},
    }
    row.update(changes)
    return row


@pytest.mark.parametrize("fmt", ["avro", "json_schema"])
def test_every_logical_type(decoder: EnvelopeDecoder, fmt: str) -> None:
    event = decoder.decode(encode(fmt, envelope("c", None, kitchen_row(), table="kitchen"), "kitchen"))
    a = event.after
    assert (a["k"], a["small"], a["f"], a["flag"]) == (1, -7, 1.5, True)
    assert a["blob"] == b"\x00\x01\xfe"
    assert_decimal(a["big"], "-123456789012345678901234567890.0123456789")  # 40 digits > default context
    assert_decimal(a["odd"], "0.00012")
    assert_decimal(a["var2"], "98765432109876543210987654321.123")
    assert_decimal(a["var3"], "-0.5")
    assert a["ts_ms"] == datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert a["ts_ns"] == TS  # 678901999 ns -> floored to 678901 µs
    assert a["t_ms"] == time(3, 4, 5, 678000)
    assert a["t_us"] == time(23, 59, 59, 999999)
    assert a["t_ns"] == time(1, 0, 0, 123456)
    assert a["t_z"] == time(3, 4, 5, 123456, tzinfo=UTC)
    assert a["c_date"] == date(1969, 12, 31)
    assert a["c_time"] == time(12, 0, 0, 1000)
    assert a["c_ts"] == datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert a["c_ts"].tzinfo is not None and a["c_ts"].utcoffset() == timedelta(0)
    assert (a["uuid"], a["xml"], a["status"], a["flags"]) == (
        "b5a4c0de-0000-4000-8000-000000000001",
        "<a>1</a>",
        "on",
        "a,b",
    )
    assert a["dur"] == 3_600_000_000  # MicroDuration stays an int (approximate µs)
    assert a["ivl"] == "P1Y2M3DT4H5M6.78S"  # Interval (string mode) stays a str
    assert a["int_arr"] == [1, None, -3]
    assert a["date_arr"] == [date(1970, 1, 1), None, date(2024, 1, 2)]
    assert a["hs"] == {"k": "v", "n": None}
    assert a["geom"] == {"wkb": b"\x01\x01\x00", "srid": 4326}


@pytest.mark.parametrize("fmt", ["avro", "json_schema"])
def test_nulls_stay_null(decoder: EnvelopeDecoder, fmt: str) -> None:
    row = {c["field"]: None for c in KITCHEN_COLUMNS if c["optional"]}
    event = decoder.decode(encode(fmt, envelope("c", None, kitchen_row(**row), table="kitchen"), "kitchen"))
    assert all(event.after[name] is None for name in row)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-02T03:04:05.123456Z", datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2024-01-02T03:04:05Z", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2024-01-02T03:04:05.1Z", datetime(2024, 1, 2, 3, 4, 5, 100000, tzinfo=UTC)),
        ("2024-01-02T03:04:05.123456789Z", datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2024-01-02T05:04:05.5+02:00", datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
        ("2024-01-01T22:34:05-04:30", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
    ],
)
@pytest.mark.parametrize("fmt", ["avro", "json_schema"])
def test_zoned_timestamp(decoder: EnvelopeDecoder, fmt: str, text: str, expected: datetime) -> None:
    event = decoder.decode(encode(fmt, envelope("c", None, items_row(created_at=text))))
    assert event.after["created_at"] == expected
    assert event.after["created_at"].utcoffset() == timedelta(0)
    assert event.after["created_at"].tzinfo is UTC


def test_zoned_time_with_offset_is_normalised_to_utc(decoder: EnvelopeDecoder) -> None:
    event = decoder.decode(
        encode("avro", envelope("c", None, kitchen_row(t_z="01:00:00+02:00"), table="kitchen"), "kitchen")
    )
    assert event.after["t_z"] == time(23, 0, tzinfo=UTC)


@pytest.mark.parametrize("fmt", ["avro", "json_schema"])
def test_decimal_scale_is_kept_exactly(decoder: EnvelopeDecoder, fmt: str) -> None:
    for text in ("0.0000", "-0.0001", "99999999.9999", "1.0000"):
        event = decoder.decode(encode(fmt, envelope("c", None, items_row(amount=unscaled(text, 4), var=vsd(text)))))
        assert_decimal(event.after["amount"], text)
        assert_decimal(event.after["var"], text)


def test_negative_timestamps_floor_to_the_earlier_microsecond(decoder: EnvelopeDecoder) -> None:
    event = decoder.decode(
        encode("avro", envelope("c", None, kitchen_row(ts_ns=-1, t_ns=1999), table="kitchen"), "kitchen")
    )
    assert event.after["ts_ns"] == datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert event.after["t_ns"] == time(0, 0, 0, 1)


def test_json_decimal_as_number_and_special_floats() -> None:
    """decimal.format=NUMERIC writes Decimals as JSON numbers; Jackson writes NaN/Infinity as strings."""
    value = jsonify(envelope("c", None, kitchen_row(f=float("nan")), table="kitchen"))
    value["after"]["big"] = 12.5  # written as a JSON number
    value["after"]["odd"] = 0.00012
    message = json.dumps({"schema": KITCHEN, "payload": value}).encode()
    after = EnvelopeDecoder(None).decode(message).after
    assert_decimal(after["big"], "12.5000000000")
    assert_decimal(after["odd"], "0.00012")
    assert math.isnan(after["f"])
    for special, expected in (("Infinity", math.inf), ("-Infinity", -math.inf)):
        value["after"]["f"] = special
        assert (
            EnvelopeDecoder(None).decode(json.dumps({"schema": KITCHEN, "payload": value}).encode()).after["f"]
            == expected
        )


def test_json_without_schema_passes_values_through(decoder: EnvelopeDecoder) -> None:
    event = decoder.decode(encode("json_plain", envelope("c", None, kitchen_row(), table="kitchen"), "kitchen"))
    a = event.after
    assert a["big"] == base64.b64encode(unscaled("-123456789012345678901234567890.0123456789", 10)).decode()
    assert a["var2"]["value"] == base64.b64encode(kitchen_row()["var2"]["value"]).decode()
    assert a["ts_ns"] == epoch_us(TS) * 1000 + 999 and a["t_z"] == "03:04:05.123456Z"
    assert a["f"] == Decimal("1.5")  # non-integer JSON numbers are parsed exactly, as Decimal


def test_json_fast_path_and_general_path_agree(decoder: EnvelopeDecoder) -> None:
    value = jsonify(envelope("u", items_row(), items_row(name="x")))
    compact = json.dumps({"schema": ITEMS, "payload": value}, separators=(",", ":")).encode()
    spaced = json.dumps({"schema": ITEMS, "payload": value}, indent=2).encode()
    reordered = json.dumps({"payload": value, "schema": ITEMS}).encode()
    # `,"payload":` inside the schema (a struct default with a key "payload") must not confuse the split.
    meta = col(
        "meta",
        "struct",
        optional=True,
        default={"x": 1, "payload": "d"},
        fields=[col("x", "int32"), col("payload", "string", optional=True)],
    )
    tricky_schema = envelope_schema("items", [*ITEMS_COLUMNS, meta])
    assert b',"payload":' in json.dumps(tricky_schema, separators=(",", ":")).encode()
    tricky_value = jsonify(envelope("u", None, items_row(meta={"x": 2, "payload": "p"})))
    tricky = json.dumps({"schema": tricky_schema, "payload": tricky_value}, separators=(",", ":")).encode()
    events = [decoder.decode(m) for m in (compact, compact, spaced, reordered)]
    assert all(_comparable(e) == _comparable(events[0]) for e in events)
    assert_items_after(events[0].before)
    tricky_event = decoder.decode(tricky)
    assert tricky_event.after["meta"] == {"x": 2, "payload": "p"}
    assert_items_after(tricky_event.after)


# ---------------------------------------------------------------------------------------------
# Poison messages: every DecodeError class
# ---------------------------------------------------------------------------------------------


def raises(error_class: str, value: bytes | None, decoder: EnvelopeDecoder | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        (decoder or EnvelopeDecoder(StaticRegistry(dict(SCHEMAS)))).decode(value)
    assert info.value.error_class == error_class, str(info.value)
    assert str(info.value)  # a human reason
    return info.value


def test_wrong_magic_byte() -> None:
    error = raises("wrong_magic_byte", b"\x01\x00\x00\x00\x07rest")
    assert "0x01" in str(error)
    assert "0x5b" in str(raises("wrong_magic_byte", b"[1, 2]"))
    assert "0x20" in str(raises("wrong_magic_byte", b' {"op": "c"}'))


def test_empty_value() -> None:
    raises("empty_value", b"")


def test_unknown_schema_id() -> None:
    message = encode("avro", envelope("c", None, items_row()))
    raises("unknown_schema_id", frame(999, message[5:]))


def test_truncated_avro() -> None:
    message = encode("avro", envelope("c", None, items_row()))
    for cut in range(1, len(message)):
        with pytest.raises(DecodeError) as info:
            EnvelopeDecoder(StaticRegistry(dict(SCHEMAS))).decode(message[:cut])
        assert info.value.error_class == "truncated_avro", (cut, str(info.value))


def test_corrupt_avro() -> None:
    message = encode("avro", envelope("c", None, items_row()))
    assert "left after the record" in str(raises("corrupt_avro", message + b"\x00"))
    # A union branch index that does not exist, in the first field (`before`).
    raises("corrupt_avro", message[:5] + b"\x08" + message[6:])


def test_invalid_json() -> None:
    assert "invalid JSON" in str(raises("invalid_json", b'{"op": "c", '))
    raises("invalid_json", b'{"schema": {"type": "struct"}, "payload": {"op": "c"')
    raises("invalid_json", b'{"op": "\xff"}')


def test_missing_op() -> None:
    heartbeat = {"ts_ms": 1_704_164_645_000}
    assert "heartbeat" in str(raises("missing_op", json.dumps(heartbeat).encode()))
    heartbeat_schema = {
        "type": "record",
        "name": "Heartbeat",
        "namespace": "io.debezium.connector.common",
        "fields": [{"name": "ts_ms", "type": "long"}],
        "connect.name": "io.debezium.connector.common.Heartbeat",
    }
    registry = StaticRegistry({40: heartbeat_schema})
    raises("missing_op", avro_message(40, heartbeat_schema, heartbeat), EnvelopeDecoder(registry))
    transaction = {"status": "END", "id": "571:53195832", "event_count": 2, "data_collections": [], "ts_ms": 1}
    raises("missing_op", json.dumps(transaction).encode())
    no_op = jsonify(envelope("c", None, items_row()))
    del no_op["op"]
    raises("missing_op", json.dumps(no_op).encode())


@pytest.mark.parametrize("op", ["x", "n", "cmd", "C", 5])
def test_unsupported_op(op: Any) -> None:
    value = jsonify(envelope("c", None, items_row()))
    value["op"] = op
    raises("unsupported_op", json.dumps(value).encode())
    if isinstance(op, str):
        raises("unsupported_op", encode("avro", {**envelope("c", None, items_row()), "op": op}))


def test_not_a_debezium_envelope() -> None:
    string_schema = {"type": "string"}
    registry = StaticRegistry({41: string_schema})
    raises("not_a_debezium_envelope", avro_message(41, string_schema, "hello"), EnvelopeDecoder(registry))  # type: ignore[arg-type]
    no_source = jsonify(envelope("c", None, items_row()))
    del no_source["source"]
    raises("not_a_debezium_envelope", json.dumps(no_source).encode())
    raises("not_a_debezium_envelope", json.dumps({**no_source, "source": {"ts_ms": 1}}).encode())
    create_without_after = jsonify(envelope("c", None, None))
    raises("not_a_debezium_envelope", json.dumps(create_without_after).encode())
    raises("not_a_debezium_envelope", encode("avro", envelope("u", items_row(), None)))
    bad_lsn = jsonify(envelope("c", None, items_row()))
    bad_lsn["source"]["lsn"] = "0/16B3748"
    raises("not_a_debezium_envelope", json.dumps(bad_lsn).encode())
    no_rows = {"op": "c", "source": source("items")}
    raises("not_a_debezium_envelope", json.dumps(no_rows).encode())
    raises("not_a_debezium_envelope", b'{"schema": null, "payload": "just a string"}')


def test_json_top_level_non_object_is_not_an_envelope() -> None:
    # Starts with '{' is required to be taken as JSON at all; a JSON-with-schema wrapper can still
    # carry a non-object payload.
    raises("not_a_debezium_envelope", b'{"schema":{"type":"int64","optional":false},"payload":5}')


@pytest.mark.parametrize(
    ("table", "changes", "fragment"),
    [
        ("items", {"created_at": "infinity"}, "items.created_at"),
        ("items", {"created_at": "2024-01-02T03:04:05"}, "without a UTC offset"),
        ("items", {"created_at": "+10000-01-01T00:00:00Z"}, "items.created_at"),
        ("items", {"day": 3_000_000}, "items.day"),
        ("items", {"ts": 9_223_372_036_854_775_807}, "items.ts"),  # 'infinity' as Long.MAX_VALUE
        ("kitchen", {"t_us": 86_400_000_000}, "24:00:00"),  # PostgreSQL TIME '24:00:00'
        ("kitchen", {"t_z": "25:00:00Z"}, "kitchen.t_z"),
        ("kitchen", {"date_arr": [0, 99_999_999]}, "kitchen.date_arr"),
    ],
)
@pytest.mark.parametrize("fmt", ["avro", "json_schema"])
def test_bad_logical_value(fmt: str, table: str, changes: dict, fragment: str) -> None:
    row = items_row(**changes) if table == "items" else kitchen_row(**changes)
    error = raises("bad_logical_value", encode(fmt, envelope("c", None, row, table=table), table))
    assert fragment in str(error)


def test_bad_logical_value_json_only() -> None:
    value = jsonify(envelope("c", None, items_row()))
    value["after"]["amount"] = "not base64!"
    assert "items.amount" in str(raises("bad_logical_value", json.dumps({"schema": ITEMS, "payload": value}).encode()))
    value["after"]["amount"] = 1.23456  # NUMERIC format with more digits than the scale: no rounding
    raises("bad_logical_value", json.dumps({"schema": ITEMS, "payload": value}).encode())
    value["after"]["amount"] = True
    raises("bad_logical_value", json.dumps({"schema": ITEMS, "payload": value}).encode())
    value = jsonify(envelope("c", None, items_row()))
    value["after"]["var"] = {"scale": 2}
    assert "items.var" in str(raises("bad_logical_value", json.dumps({"schema": ITEMS, "payload": value}).encode()))


def test_bad_logical_value_in_a_fastavro_logical_type() -> None:
    # Connect Date with Avro logicalType "date": fastavro converts while reading.
    message = encode("avro", envelope("c", None, kitchen_row(c_date=3_000_000), table="kitchen"), "kitchen")
    raises("bad_logical_value", message)


def test_avro_without_registry() -> None:
    raises("avro_without_registry", encode("avro", envelope("c", None, items_row())), EnvelopeDecoder(None))


def test_invalid_writer_schema_is_cached() -> None:
    registry = StaticRegistry(
        {50: '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}', 51: "{not json"}
    )
    decoder = EnvelopeDecoder(registry)
    for _ in range(3):
        raises("invalid_writer_schema", frame(50, b"\x00"), decoder)
        raises("invalid_writer_schema", frame(51, b"\x00"), decoder)
    assert registry.fetches == 2


def test_decode_error_is_picklable_and_not_a_registry_error() -> None:
    error = DecodeError("missing_op", "no op")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.error_class, str(clone)) == ("missing_op", "no op")
    assert not issubclass(DecodeError, RegistryUnavailable) and not issubclass(RegistryUnavailable, DecodeError)


# ---------------------------------------------------------------------------------------------
# Plans are compiled once
# ---------------------------------------------------------------------------------------------


def test_schema_fetched_and_compiled_once_per_id(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = StaticRegistry(dict(SCHEMAS))
    decoder = EnvelopeDecoder(registry)
    compiled: list[Any] = []
    original = decoder._builder.avro_envelope
    monkeypatch.setattr(decoder._builder, "avro_envelope", lambda s: compiled.append(s) or original(s))
    messages = [encode("avro", envelope("c", None, items_row(id=i))) for i in range(50)]
    assert [decoder.decode(m).after["id"] for m in messages] == list(range(50))
    assert registry.fetches == 1 and len(compiled) == 1
    decoder.decode(encode("avro", envelope("c", None, kitchen_row(), table="kitchen"), "kitchen"))
    assert registry.fetches == 2 and len(compiled) == 2


def test_json_plan_compiled_once_per_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = EnvelopeDecoder(None)
    compiled: list[Any] = []
    original = decoder._builder.json_envelope
    monkeypatch.setattr(decoder._builder, "json_envelope", lambda s: compiled.append(s) or original(s))
    for i in range(20):
        assert decoder.decode(encode("json_schema", envelope("c", None, items_row(id=i)))).after["id"] == i
    assert len(compiled) == 1


# ---------------------------------------------------------------------------------------------
# Registry client against a real HTTP server on 127.0.0.1
# ---------------------------------------------------------------------------------------------


class FakeRegistry:
    """Confluent-compatible endpoints: routes[path] = (status, body, delay_seconds)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, Any, float]] = {}
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append(self.path)
                status, body, delay = fake.routes.get(self.path, (404, "<html>Not Found</html>", 0.0))
                if delay:
                    time_module.sleep(delay)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/apis/ccompat/v7"

    def add_schema(self, schema_id: int, schema: Any, **extra: Any) -> None:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        self.routes[f"/apis/ccompat/v7/schemas/ids/{schema_id}"] = (200, {"schema": text, **extra}, 0.0)


@pytest.fixture
def fake_registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        fake.thread.join(timeout=5)


def test_registry_fetches_once_and_decodes(fake_registry: FakeRegistry) -> None:
    fake_registry.add_schema(ITEMS_ID, SCHEMAS[ITEMS_ID])
    registry = SchemaRegistry(fake_registry.url, timeout=2.0)
    decoder = EnvelopeDecoder(registry)
    for _ in range(10):
        assert_items_after(decoder.decode(encode("avro", envelope("c", None, items_row()))).after)
        assert registry.schema(ITEMS_ID) is registry.schema(ITEMS_ID)
    assert fake_registry.requests == [f"/apis/ccompat/v7/schemas/ids/{ITEMS_ID}"]
    registry.close()


def test_registry_unknown_id_is_a_decode_error_remembered_for_a_while(fake_registry: FakeRegistry) -> None:
    path = "/apis/ccompat/v7/schemas/ids/404"
    fake_registry.routes[path] = (404, {"error_code": 40403, "message": "Schema 404 not found"}, 0.0)
    registry = SchemaRegistry(fake_registry.url + "/", unknown_id_ttl_s=0.3)  # a trailing slash is fine
    for _ in range(3):
        with pytest.raises(DecodeError) as info:
            registry.schema(404)
        assert info.value.error_class == "unknown_schema_id" and "40403" in str(info.value)
    assert fake_registry.requests == [path], "not asked again for every message"
    fake_registry.add_schema(404, SCHEMAS[ITEMS_ID])
    time_module.sleep(0.4)  # a later registration is picked up once the id is forgotten
    assert registry.schema(404)["type"] == "record"


def test_registry_answer_too_large_is_a_permanent_decode_error(fake_registry: FakeRegistry) -> None:
    path = "/apis/ccompat/v7/schemas/ids/77"
    fake_registry.routes[path] = (200, {"schema": "x" * (MAX_RESPONSE_BYTES + 10)}, 0.0)
    registry = SchemaRegistry(fake_registry.url)
    for _ in range(2):
        with pytest.raises(DecodeError) as info:
            registry.schema(77)
        assert info.value.error_class == "writer_schema_too_large"
    assert fake_registry.requests == [path]


def test_registry_404_from_a_wrong_url_is_unavailable_not_poison(fake_registry: FakeRegistry) -> None:
    registry = SchemaRegistry(fake_registry.url.removesuffix("/apis/ccompat/v7"))
    with pytest.raises(RegistryUnavailable, match="registry URL"):
        registry.schema(1)


@pytest.mark.parametrize("status", [500, 502, 503, 429, 401])
def test_registry_errors_are_unavailable(fake_registry: FakeRegistry, status: int) -> None:
    fake_registry.routes["/apis/ccompat/v7/schemas/ids/1"] = (status, {"error_code": status * 100, "message": "x"}, 0.0)
    registry = SchemaRegistry(fake_registry.url)
    decoder = EnvelopeDecoder(registry)
    with pytest.raises(RegistryUnavailable, match=str(status)):
        decoder.decode(frame(1, b"\x00"))
    fake_registry.add_schema(1, SCHEMAS[ITEMS_ID])  # recovers: failures are not cached
    with pytest.raises(DecodeError, match=r"ended early"):
        decoder.decode(frame(1, b"\x00"))


def test_registry_non_json_answer_is_unavailable(fake_registry: FakeRegistry) -> None:
    fake_registry.routes["/apis/ccompat/v7/schemas/ids/1"] = (200, "<html>proxy login</html>", 0.0)
    with pytest.raises(RegistryUnavailable, match="not a JSON object"):
        SchemaRegistry(fake_registry.url).schema(1)


def test_registry_timeout_is_unavailable(fake_registry: FakeRegistry) -> None:
    fake_registry.routes["/apis/ccompat/v7/schemas/ids/1"] = (200, {"schema": '"string"'}, 0.6)
    with pytest.raises(RegistryUnavailable, match="timed out"):
        SchemaRegistry(fake_registry.url, timeout=0.1).schema(1)


def test_registry_connection_refused_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    decoder = EnvelopeDecoder(SchemaRegistry(f"http://127.0.0.1:{port}/apis/ccompat/v7", timeout=1.0))
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        decoder.decode(encode("avro", envelope("c", None, items_row())))


def test_registry_non_avro_schema_type(fake_registry: FakeRegistry) -> None:
    fake_registry.add_schema(3, 'syntax = "proto3";', schemaType="PROTOBUF")
    registry = SchemaRegistry(fake_registry.url)
    for _ in range(2):
        with pytest.raises(DecodeError) as info:
            registry.schema(3)
        assert info.value.error_class == "unsupported_schema_type"
    assert len(fake_registry.requests) == 1  # permanent: cached


def test_registry_resolves_schema_references(fake_registry: FakeRegistry) -> None:
    vsd_schema = {
        "type": "record",
        "name": "VariableScaleDecimal",
        "namespace": "io.debezium.data",
        "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
        "connect.name": "io.debezium.data.VariableScaleDecimal",
    }
    envelope_schema_ = {
        "type": "record",
        "name": "Envelope",
        "namespace": "r.public.t",
        "fields": [
            {
                "name": "before",
                "type": [
                    "null",
                    {
                        "type": "record",
                        "name": "Value",
                        "fields": [{"name": "v", "type": "io.debezium.data.VariableScaleDecimal"}],
                    },
                ],
                "default": None,
            },
            {"name": "after", "type": ["null", "Value"], "default": None},
            {
                "name": "source",
                "type": {"type": "record", "name": "Source", "fields": [{"name": "table", "type": "string"}]},
            },
            {"name": "op", "type": "string"},
        ],
    }
    fake_registry.add_schema(
        5,
        envelope_schema_,
        references=[{"name": "io.debezium.data.VariableScaleDecimal", "subject": "vsd/x", "version": 1}],
    )
    fake_registry.routes["/apis/ccompat/v7/subjects/vsd%2Fx/versions/1"] = (
        200,
        {"schema": json.dumps(vsd_schema)},
        0.0,
    )
    registry = SchemaRegistry(fake_registry.url)
    message = {"before": None, "after": {"v": vsd("-1.50")}, "source": {"table": "t"}, "op": "c"}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, registry.schema(5), message)
    event = EnvelopeDecoder(registry).decode(frame(5, out.getvalue()))
    assert_decimal(event.after["v"], "-1.50")


def test_parse_writer_schema_keeps_connect_properties() -> None:
    parsed = parse_writer_schema(SCHEMAS[ITEMS_ID])
    value = parsed["fields"][0]["type"][1]
    amount = next(f for f in value["fields"] if f["name"] == "amount")["type"]
    assert amount["connect.name"] == DECIMAL and amount["logicalType"] == "decimal"
    kitchen = parse_writer_schema(SCHEMAS[KITCHEN_ID])["fields"][0]["type"][1]
    odd = next(f for f in kitchen["fields"] if f["name"] == "odd")["type"][1]
    assert "logicalType" not in odd and odd["connect.parameters"]["scale"] == "5"  # fastavro refuses scale > precision
    c_ts = next(f for f in kitchen["fields"] if f["name"] == "c_ts")["type"][1]
    assert "logicalType" not in c_ts and c_ts["connect.name"] == "org.apache.kafka.connect.data.Timestamp"


def test_fastavro_converted_connect_types_are_accepted_too() -> None:
    """A schema parsed without our normalization (fastavro converts Connect Date/Time/Timestamp and
    Decimal itself) decodes to the same values."""
    decoder = EnvelopeDecoder(StaticRegistry(dict(SCHEMAS)))
    value = envelope("c", None, kitchen_row(odd=None), table="kitchen")
    kitchen_schema = copy.deepcopy(SCHEMAS[KITCHEN_ID])
    value_fields = kitchen_schema["fields"][0]["type"][1]["fields"]
    value_fields[:] = [f for f in value_fields if f["name"] != "odd"]  # fastavro cannot parse that one
    del value["after"]["odd"]
    parsed = fastavro.parse_schema(kitchen_schema)
    decoder._registry.schema = lambda _id: parsed  # type: ignore[method-assign]
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed, value)
    after = decoder.decode(frame(KITCHEN_ID, out.getvalue())).after
    assert after["c_ts"] == datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert after["c_date"] == date(1969, 12, 31) and after["c_time"] == time(12, 0, 0, 1000)
    assert_decimal(after["big"], "-123456789012345678901234567890.0123456789")


# ---------------------------------------------------------------------------------------------
# Real messages from the stack
# ---------------------------------------------------------------------------------------------

# Captured from the running stack (Debezium 3.6.1 pgoutput -> AvroConverter -> Apicurio 3.3 ccompat),
# read-only: raw message values (hex) and the registry's answer for each schema id.
CAPTURED_SCHEMAS = {
    2: (
        '{"type":"record","name":"Heartbeat","namespace":"io.debezium.connector.common","fields":[{"name":"ts'
        '_ms","type":"long"}],"connect.version":1,"connect.name":"io.debezium.connector.common.Heartbeat"}'
    ),
    8: (
        '{"type":"record","name":"Envelope","namespace":"adtech.public.campaign","fields":[{"name":"before","'
        'type":["null",{"type":"record","name":"Value","fields":[{"name":"id","type":"long"},{"name":"adverti'
        'ser_id","type":"long"},{"name":"name","type":"string"},{"name":"bid_amount","type":{"type":"bytes","'
        'scale":4,"precision":12,"connect.version":1,"connect.parameters":{"scale":"4","connect.decimal.preci'
        'sion":"12"},"connect.default":"\\u0000","connect.name":"org.apache.kafka.connect.data.Decimal","logic'
        'alType":"decimal"},"default":"\\u0000"},{"name":"budget","type":{"type":"bytes","scale":2,"precision"'
        ':14,"connect.version":1,"connect.parameters":{"scale":"2","connect.decimal.precision":"14"},"connect'
        '.default":"\\u0000","connect.name":"org.apache.kafka.connect.data.Decimal","logicalType":"decimal"},"'
        'default":"\\u0000"},{"name":"status","type":{"type":"string","connect.default":"active"},"default":"a'
        'ctive"},{"name":"creative","type":{"type":"string","connect.default":""},"default":""},{"name":"crea'
        'ted_at","type":{"type":"string","connect.version":1,"connect.default":"1970-01-01T00:00:00.000000Z",'
        '"connect.name":"io.debezium.time.ZonedTimestamp"},"default":"1970-01-01T00:00:00.000000Z"},{"name":"'
        'updated_at","type":{"type":"string","connect.version":1,"connect.default":"1970-01-01T00:00:00.00000'
        '0Z","connect.name":"io.debezium.time.ZonedTimestamp"},"default":"1970-01-01T00:00:00.000000Z"}],"con'
        'nect.name":"adtech.public.campaign.Value"}],"default":null},{"name":"after","type":["null","Value"],'
        '"default":null},{"name":"source","type":{"type":"record","name":"Source","namespace":"io.debezium.co'
        'nnector.postgresql","fields":[{"name":"version","type":"string"},{"name":"connector","type":"string"'
        '},{"name":"name","type":"string"},{"name":"ts_ms","type":"long"},{"name":"snapshot","type":[{"type":'
        '"string","connect.version":1,"connect.parameters":{"allowed":"true,first,first_in_data_collection,la'
        'st_in_data_collection,last,false,incremental"},"connect.default":"false","connect.name":"io.debezium'
        '.data.Enum"},"null"],"default":"false"},{"name":"db","type":"string"},{"name":"sequence","type":["nu'
        'll","string"],"default":null},{"name":"ts_us","type":["null","long"],"default":null},{"name":"ts_ns"'
        ',"type":["null","long"],"default":null},{"name":"schema","type":"string"},{"name":"table","type":"st'
        'ring"},{"name":"txId","type":["null","long"],"default":null},{"name":"lsn","type":["null","long"],"d'
        'efault":null},{"name":"xmin","type":["null","long"],"default":null},{"name":"origin","type":["null",'
        '"string"],"default":null},{"name":"origin_lsn","type":["null","long"],"default":null}],"connect.vers'
        'ion":1,"connect.name":"io.debezium.connector.postgresql.Source"}},{"name":"transaction","type":["nul'
        'l",{"type":"record","name":"block","namespace":"event","fields":[{"name":"id","type":"string"},{"nam'
        'e":"total_order","type":"long"},{"name":"data_collection_order","type":"long"}],"connect.version":1,'
        '"connect.name":"event.block"}],"default":null},{"name":"op","type":"string"},{"name":"ts_ms","type":'
        '["null","long"],"default":null},{"name":"ts_us","type":["null","long"],"default":null},{"name":"ts_n'
        's","type":["null","long"],"default":null}],"connect.version":2,"connect.name":"adtech.public.campaig'
        'n.Envelope"}'
    ),
    10: (
        '{"type":"record","name":"Envelope","namespace":"adtech.public.impressions","fields":[{"name":"before'
        '","type":["null",{"type":"record","name":"Value","fields":[{"name":"id","type":"long"},{"name":"camp'
        'aign_id","type":"long"},{"name":"created_at","type":{"type":"string","connect.version":1,"connect.de'
        'fault":"1970-01-01T00:00:00.000000Z","connect.name":"io.debezium.time.ZonedTimestamp"},"default":"19'
        '70-01-01T00:00:00.000000Z"},{"name":"cost","type":{"type":"bytes","scale":6,"precision":12,"connect.'
        'version":1,"connect.parameters":{"scale":"6","connect.decimal.precision":"12"},"connect.default":"\\u'
        '0000","connect.name":"org.apache.kafka.connect.data.Decimal","logicalType":"decimal"},"default":"\\u0'
        '000"}],"connect.name":"adtech.public.impressions.Value"}],"default":null},{"name":"after","type":["n'
        'ull","Value"],"default":null},{"name":"source","type":{"type":"record","name":"Source","namespace":"'
        'io.debezium.connector.postgresql","fields":[{"name":"version","type":"string"},{"name":"connector","'
        'type":"string"},{"name":"name","type":"string"},{"name":"ts_ms","type":"long"},{"name":"snapshot","t'
        'ype":[{"type":"string","connect.version":1,"connect.parameters":{"allowed":"true,first,first_in_data'
        '_collection,last_in_data_collection,last,false,incremental"},"connect.default":"false","connect.name'
        '":"io.debezium.data.Enum"},"null"],"default":"false"},{"name":"db","type":"string"},{"name":"sequenc'
        'e","type":["null","string"],"default":null},{"name":"ts_us","type":["null","long"],"default":null},{'
        '"name":"ts_ns","type":["null","long"],"default":null},{"name":"schema","type":"string"},{"name":"tab'
        'le","type":"string"},{"name":"txId","type":["null","long"],"default":null},{"name":"lsn","type":["nu'
        'll","long"],"default":null},{"name":"xmin","type":["null","long"],"default":null},{"name":"origin","'
        'type":["null","string"],"default":null},{"name":"origin_lsn","type":["null","long"],"default":null}]'
        ',"connect.version":1,"connect.name":"io.debezium.connector.postgresql.Source"}},{"name":"transaction'
        '","type":["null",{"type":"record","name":"block","namespace":"event","fields":[{"name":"id","type":"'
        'string"},{"name":"total_order","type":"long"},{"name":"data_collection_order","type":"long"}],"conne'
        'ct.version":1,"connect.name":"event.block"}],"default":null},{"name":"op","type":"string"},{"name":"'
        'ts_ms","type":["null","long"],"default":null},{"name":"ts_us","type":["null","long"],"default":null}'
        ',{"name":"ts_ns","type":["null","long"],"default":null}],"connect.version":2,"connect.name":"adtech.'
        'public.impressions.Envelope"}'
    ),
}
CAPTURED = {
    "campaign_update_unchanged_toast": bytes.fromhex(
        "00000000080002140236486f6c696461792041707020496e7374616c6c202d20566964656f060090f1062e2b240c6163"
        "74697665385f5f646562657a69756d5f756e617661696c61626c655f76616c756536323032362d31312d32375431383a"
        "30313a34312e3538323131375a36323032362d31312d32375431383a30313a34312e3630323831335a16332e362e312e"
        "46696e616c14706f737467726573716c0c61647465636894c7dce2c368000a66616c73650c616474656368022e5b2232"
        "37353038333230222c223237353230373630225d02f8828ca3bbd1b00602c0f9f6958ab7fceb310c7075626c69631063"
        "616d706169676e02f20c02f0bb9f1a0000000002750284cbdce2c36802be9baaa3bbd1b00602ecdfe6818cb7fceb31"
    ),
    "campaign_delete_default_identity": bytes.fromhex(
        "000000000802300000020002000c6163746976650036313937302d30312d30315430303a30303a30302e303030303030"
        "5a36313937302d30312d30315430303a30303a30302e3030303030305a0016332e362e312e46696e616c14706f737467"
        "726573716c0c6164746563688e94e8e2c368000a66616c73650c616474656368022e5b223337313230313834222c2233"
        "37313338353532225d02e893ddfdbbd1b00602c0e4e29fcebcfceb310c7075626c69631063616d706169676e02dc0e02"
        "f0c1b52300000000026402ba97e8e2c36802daa9f7fdbbd1b00602d8f39deccfbcfceb31"
    ),
    "impressions_create": bytes.fromhex(
        "000000000a0002060636323032362d31312d32375431383a30313a34302e3734303936375a040ccc16332e362e312e46"
        "696e616c14706f737467726573716c0c61647465636886b9dce2c368000a66616c73650c616474656368022e5b223236"
        "383935313932222c223236393933323030225d02f4db9da2bbd1b00602a08296b883b7fceb310c7075626c696316696d"
        "7072657373696f6e7302e00c02e088df19000000000263028ac0dce2c36802f6dad4a2bbd1b00602fca9e6e586b7fceb"
        "31"
    ),
    "impressions_delete_full_identity": bytes.fromhex(
        "000000000a02aa060836323032362d31312d32375431383a30313a34302e3838323138355a0406dd0016332e362e312e"
        "46696e616c14706f737467726573716c0c616474656368dabddce2c368000a66616c73650c616474656368022e5b2232"
        "37313533383838222c223237313639393336225d02aa89c2a2bbd1b0060290f098d485b7fceb310c7075626c69631669"
        "6d7072657373696f6e7302e60c02a0d2f41900000000026402a0c5dce2c368028290fda2bbd1b006029e92c5a189b7fc"
        "eb31"
    ),
    "impressions_update_full_identity": bytes.fromhex(
        "000000000a02e60f0636323032362d31312d32375431383a30313a34312e3135343639335a040c1f02e60f0636323032"
        "362d31312d32375431383a30313a34312e3135343639335a04099b16332e362e312e46696e616c14706f737467726573"
        "716c0c616474656368f8c3dce2c368000a66616c73650c616474656368022e5b223237343033363732222c2232373430"
        "33393532225d02fee4f2a2bbd1b00602b0f8e4d088b7fceb310c7075626c696316696d7072657373696f6e7302ee0c02"
        "e09a911a0000000002750282c9dce2c3680298c09aa3bbd1b00602bcc185878bb7fceb31"
    ),
    "heartbeat": bytes.fromhex("0000000002faaa87e2c368"),
}


def test_captured_campaign_update_with_unchanged_toast() -> None:
    event = decode_bytes(CAPTURED["campaign_update_unchanged_toast"], CAPTURED_SCHEMAS)
    assert (event.op, event.table, event.before, event.lsn, event.snapshot) == ("u", "campaign", None, 27520760, False)
    assert event.after["creative"] is UNCHANGED_TOAST  # REPLICA IDENTITY DEFAULT, creative untouched
    assert_decimal(event.after["bid_amount"], "3.7105")
    assert_decimal(event.after["budget"], "30257.00")
    assert event.after["updated_at"] == datetime(2026, 11, 27, 18, 1, 41, 602813, tzinfo=UTC)


def test_captured_campaign_delete_carries_key_plus_filler_values() -> None:
    """REPLICA IDENTITY DEFAULT: `before` is not "only the key": the other NOT NULL columns are
    present with Debezium's zero values ('' / 0 / epoch), which must not be taken as data."""
    event = decode_bytes(CAPTURED["campaign_delete_default_identity"], CAPTURED_SCHEMAS)
    assert (event.op, event.after) == ("d", None)
    assert event.before["id"] == 24 and event.before["advertiser_id"] == 0 and event.before["name"] == ""
    assert event.before["created_at"] == EPOCH
    assert_decimal(event.before["bid_amount"], "0.0000")


def test_captured_impressions_with_full_identity() -> None:
    created = decode_bytes(CAPTURED["impressions_create"], CAPTURED_SCHEMAS)
    assert_decimal(created.after["cost"], "0.003276")
    assert created.commit_ts_ms == 1795802500675
    updated = decode_bytes(CAPTURED["impressions_update_full_identity"], CAPTURED_SCHEMAS)
    assert_decimal(updated.before["cost"], "0.003103")
    assert_decimal(updated.after["cost"], "0.002459")
    deleted = decode_bytes(CAPTURED["impressions_delete_full_identity"], CAPTURED_SCHEMAS)
    assert deleted.before == {
        "id": 405,
        "campaign_id": 4,
        "created_at": datetime(2026, 11, 27, 18, 1, 40, 882185, tzinfo=UTC),
        "cost": Decimal("0.001757"),
    }


def test_captured_heartbeat_is_missing_op() -> None:
    with pytest.raises(DecodeError) as info:
        decode_bytes(CAPTURED["heartbeat"], CAPTURED_SCHEMAS)
    assert info.value.error_class == "missing_op"


def test_synthetic_source_schema_matches_the_captured_one() -> None:
    captured = json.loads(CAPTURED_SCHEMAS[8])
    captured_source = next(f for f in captured["fields"] if f["name"] == "source")["type"]
    synthetic_source = next(f for f in SCHEMAS[ITEMS_ID]["fields"] if f["name"] == "source")["type"]
    assert synthetic_source == captured_source
    captured_fields = [f["name"] for f in captured["fields"]]
    assert captured_fields == [f["name"] for f in SCHEMAS[ITEMS_ID]["fields"]]
    assert captured["connect.version"] == SCHEMAS[ITEMS_ID]["connect.version"] == 2


# ---------------------------------------------------------------------------------------------
# Captured messages (added later)
# ---------------------------------------------------------------------------------------------


def _captured() -> list[Path]:
    return sorted(ENVELOPES.glob("*.json"))


@pytest.mark.parametrize("path", _captured(), ids=lambda p: p.stem)
def test_captured_real_envelopes_decode_and_map(path: Path) -> None:
    """`tests/fixtures/envelopes/<table>_<op>.json`: real messages the stack's Debezium wrote
    (saved by tests/test_stack.py), with their writer schema from the registry."""
    captured = json.loads(path.read_text())
    table, op = path.stem.rsplit("_", 1)
    event = decode_bytes(bytes.fromhex(captured["value_hex"]), {captured["schema_id"]: json.dumps(captured["schema"])})
    assert (event.op, event.table) == (op, table)
    assert event.lsn and event.commit_ts_ms
    image = event.before if op == "d" else event.after
    assert isinstance(image["id"], int)
    if "created_at" in image:
        assert image["created_at"].tzinfo is not None
    for money in ("cost", "bid_amount", "budget"):
        if money in image and image[money] is not UNCHANGED_TOAST:
            assert isinstance(image[money], Decimal)
    mapping = load_mapping()
    target = next(t for t in mapping.tables if t.topic.endswith(f".{table}"))
    rows = Mapper(mapping).rows(target, event, tiebreak=captured["offset"])
    assert len(rows) == (2 if op == "u" and target.role == "fact" else 1)


def test_helpers_roundtrip_raw_bytes() -> None:
    raw = encode("avro", envelope("c", None, items_row()))
    assert decode_bytes(raw, SCHEMAS).op == "c"
    assert decode_bytes(encode("json_schema", envelope("d", items_key_row(), None))).op == "d"
