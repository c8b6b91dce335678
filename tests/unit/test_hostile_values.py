"""Values outside what their ClickHouse column holds, and messages built to exhaust the decoder,
are poison of a precise class: never an insert ClickHouse refuses, never an exception of
another kind (issue 14)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import tracemalloc
from contextlib import contextmanager
from decimal import Decimal

import pytest

from consumer.core.errors import MappingError, Poison
from consumer.core.types import ChangeEvent
from consumer.decode.envelope import EnvelopeDecoder
from consumer.decode.limits import MAX_DECIMAL_SCALE, MAX_DEPTH
from consumer.decode.registry import SchemaRegistry
from consumer.transform.clickhouse_types import converter_for
from consumer.transform.mapping import Mapper, load_mapping
from tests.unit.test_secrets import Answering


@contextmanager
def registry_answering(schema: str):
    """A registry answering every schema id with `schema`, and the requests it got."""
    server = Answering(200, {"schema": schema})
    try:
        yield SchemaRegistry(f"http://127.0.0.1:{server.port}"), server.headers
    finally:
        server.close()


MAPPING = load_mapping()
MAPPER = Mapper(MAPPING)
IMPRESSIONS = MAPPING.for_topic("adtech.public.impressions")
ADVERTISERS = MAPPING.for_topic("adtech.public.advertiser")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def impression(**values) -> ChangeEvent:
    after = {"id": 1, "campaign_id": 2, "created_at": T0, "cost": Decimal("0.5"), **values}
    return ChangeEvent("c", "impressions", None, after, 10, 0, False)


def refused(table, event) -> MappingError:
    with pytest.raises(MappingError) as error:
        MAPPER.rows(table, event, 1)
    return error.value


@pytest.mark.parametrize(
    ("values", "error_class", "words"),
    [
        ({"id": 2**63}, "int_out_of_range", "Int64"),
        ({"campaign_id": -(2**63) - 1}, "int_out_of_range", "Int64"),
        ({"id": "9" * 30}, "int_out_of_range", "Int64"),
        ({"created_at": dt.datetime(2300, 1, 1, tzinfo=dt.UTC)}, "datetime_out_of_range", "DateTime64"),
        ({"created_at": "1899-12-31T23:59:59Z"}, "datetime_out_of_range", "DateTime64"),
        ({"created_at": 2**62}, "datetime_out_of_range", "DateTime64"),
        ({"cost": Decimal("1000000")}, "decimal_out_of_range", "Decimal(12, 6)"),
        ({"cost": Decimal("1E+999999999")}, "decimal_out_of_range", "Decimal(12, 6)"),
        ({"cost": Decimal("0.1234567")}, "decimal_scale_exceeded", "more than 6 decimal places"),
    ],
)
def test_values_outside_their_column_are_poison_of_their_class(values, error_class, words) -> None:
    error = refused(IMPRESSIONS, impression(**values))
    assert error.error_class == error_class
    assert words in error.reason and "fact_impressions." in error.reason


def test_a_lone_surrogate_is_poison_not_an_insert_failure() -> None:
    text = json.loads('"ab\\ud800c"')
    after = {"id": 1, "name": text, "created_at": T0, "updated_at": T0}
    error = refused(ADVERTISERS, ChangeEvent("c", "advertiser", None, after, 10, 0, False))
    assert error.error_class == "lone_surrogate" and "dim_advertiser.name" in error.reason
    assert "at character 2" in error.reason


@pytest.mark.parametrize("lsn", [-1, 2**64, 2**80])
def test_an_lsn_outside_the_version_is_poison(lsn) -> None:
    after = {"id": 1, "name": "a", "created_at": T0, "updated_at": T0}
    error = refused(ADVERTISERS, ChangeEvent("c", "advertiser", None, after, lsn, 0, False))
    assert error.error_class == "lsn_out_of_range"
    (row,) = MAPPER.rows(ADVERTISERS, ChangeEvent("c", "advertiser", None, after, 2**64 - 1, 0, False), 7)
    assert row[-2] == (2**64 - 1) << 64 | 7, "the highest LSN still makes a UInt128 version"


@pytest.mark.parametrize(
    ("clickhouse_type", "good", "bad", "error_class"),
    [
        ("UInt8", 255, 256, "int_out_of_range"),
        ("Int8", -128, -129, "int_out_of_range"),
        ("UInt64", 2**64 - 1, -1, "int_out_of_range"),
        ("Int128", -(2**127), 2**127, "int_out_of_range"),
        ("Date", dt.date(2149, 6, 6), dt.date(2149, 6, 7), "date_out_of_range"),
        ("Date", 0, -1, "date_out_of_range"),
        ("Date32", dt.date(1900, 1, 1), dt.date(1899, 12, 31), "date_out_of_range"),
        ("Date32", 0, 10**12, "date_out_of_range"),
        ("DateTime('UTC')", dt.datetime(2106, 2, 7, 6, 28, 15, tzinfo=dt.UTC), 2**40 * 10**6, "datetime_out_of_range"),
        ("Decimal(38, 2)", Decimal("9" * 36 + ".99"), Decimal("1" + "0" * 36), "decimal_out_of_range"),
        ("Nullable(String)", "ok", "\udfff", "lone_surrogate"),
    ],
)
def test_every_type_of_the_mapping_knows_its_range(clickhouse_type, good, bad, error_class) -> None:
    from consumer.transform.clickhouse_types import OutOfRange

    convert, _ = converter_for(clickhouse_type)
    convert(good)
    with pytest.raises(OutOfRange) as error:
        convert(bad)
    assert error.value.error_class == error_class


# -- decode limits ----------------------------------------------------------------------------


def decoded(value: bytes, registry=None):
    return EnvelopeDecoder(registry).decode(value)


def poison_class(value: bytes, registry=None) -> str:
    with pytest.raises(Poison) as error:
        decoded(value, registry)
    return error.value.error_class


def envelope(**fields) -> dict:
    return {"op": "c", "before": None, "after": {"id": 1}, "source": {"table": "impressions"}, **fields}


@pytest.mark.parametrize("op", [[], {}, 1, None, ["c"]])
def test_an_op_that_is_not_a_string_is_poison(op) -> None:
    assert poison_class(json.dumps(envelope(op=op)).encode()) in ("unsupported_op", "missing_op")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1_000, 100_000])
def test_deep_json_is_poison(depth) -> None:
    nested = "[" * depth + "]" * depth
    value = b'{"op": "c", "before": null, "after": {"id": 1, "tags": ' + nested.encode() + b"}}"
    assert poison_class(value) == "too_deep"
    shallow = "[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3)
    event = decoded(json.dumps(envelope(after={"id": 1, "tags": json.loads(shallow)})).encode())
    assert event.after["id"] == 1


def test_a_deep_payload_behind_an_embedded_schema_is_poison() -> None:
    row = {"type": "struct", "optional": True, "fields": [{"field": "id", "type": "int64"}]}
    schema = {"type": "struct", "fields": [{"field": "before", **row}, {"field": "after", **row}]}
    payload = '{"op":"c","before":null,"after":{"id":1,"x":' + "[" * 5000 + "]" * 5000 + '},"source":{"table":"t"}}'
    value = (
        b'{"schema":' + json.dumps(schema, separators=(",", ":")).encode() + b',"payload":' + payload.encode() + b"}"
    )
    assert poison_class(value) == "too_deep"


def deep_connect_schema(depth: int) -> str:
    """A Connect struct nesting `depth` structs, as JSON text (json.dumps itself would recurse)."""
    return '{"type":"struct","field":"s","fields":[' * depth + '{"type":"int64","field":"leaf"}' + "]}" * depth


def test_a_deeply_nested_embedded_schema_is_poison() -> None:
    row = '{"type":"struct","optional":true,"field":"after","fields":[' + deep_connect_schema(3_000) + "]}"
    schema = '{"type":"struct","fields":[' + row + "]}"
    value = ('{"schema":' + schema + ',"payload":' + json.dumps(envelope()) + "}").encode()
    assert poison_class(value) == "too_deep"


def connect_decimal_message(scale, value="AQ==") -> bytes:
    field = {
        "type": "bytes",
        "field": "cost",
        "name": "org.apache.kafka.connect.data.Decimal",
        "parameters": {"scale": str(scale)},
    }
    row = {"type": "struct", "optional": True, "fields": [{"field": "id", "type": "int64"}, field]}
    schema = {"type": "struct", "fields": [{"field": "before", **row}, {"field": "after", **row}]}
    payload = envelope(after={"id": 1, "cost": value})
    return json.dumps({"schema": schema, "payload": payload}, separators=(",", ":")).encode()


@pytest.mark.parametrize("scale", [10**12, 5 * 10**8, MAX_DECIMAL_SCALE + 1, -(MAX_DECIMAL_SCALE + 1)])
def test_a_connect_decimal_scale_beyond_the_limit_is_poison_in_bounded_memory(scale) -> None:
    tracemalloc.start()
    try:
        assert poison_class(connect_decimal_message(scale)) == "decimal_scale_out_of_range"
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    finally:
        tracemalloc.stop()
    assert decoded(connect_decimal_message(MAX_DECIMAL_SCALE)).after["cost"] == Decimal(f"1E-{MAX_DECIMAL_SCALE}")


def test_a_numeric_decimal_of_enormous_exponent_is_poison() -> None:
    assert poison_class(connect_decimal_message(4).replace(b'"AQ=="', b"1E+999999999")) == "bad_logical_value"


@pytest.mark.parametrize("scale", [10**12, -(10**12), "4"])
def test_a_variable_scale_decimal_scale_is_bounded(scale) -> None:
    field = {"type": "struct", "field": "v", "name": "io.debezium.data.VariableScaleDecimal", "fields": []}
    row = {"type": "struct", "optional": True, "fields": [{"field": "id", "type": "int64"}, field]}
    schema = {"type": "struct", "fields": [{"field": "before", **row}, {"field": "after", **row}]}
    value = {"scale": scale, "value": base64.b64encode(b"\x01").decode()}
    message = json.dumps({"schema": schema, "payload": envelope(after={"id": 1, "v": value})}).encode()
    assert poison_class(message) in ("decimal_scale_out_of_range", "bad_decimal_scale")


def deep_avro_schema(depth: int) -> str:
    """Records nesting `depth` records, as JSON text."""
    opening = '{"type":"record","name":"r%d","fields":[{"name":"f","type":'
    return "".join(opening % level for level in range(depth)) + '"long"' + "}]}" * depth


@pytest.mark.parametrize("depth", [100, 20_000])
def test_a_deeply_nested_schema_from_the_registry_is_poison(depth) -> None:
    with registry_answering(deep_avro_schema(depth)) as (registry, requests):
        for _ in range(2):  # and remembered as such
            assert poison_class(b"\x00\x00\x00\x00\x07" + b"\x02", registry) == "too_deep"
        assert len(requests) == 1


def test_a_registry_decimal_of_huge_scale_is_poison() -> None:
    field = {"name": "cost", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10**13, "scale": 10**12}}
    schema = json.dumps({"type": "record", "name": "Envelope", "fields": [field]})
    with registry_answering(schema) as (registry, _):
        assert poison_class(b"\x00\x00\x00\x00\x08\x02\x01", registry) == "decimal_scale_out_of_range"


def test_invalid_utf8_in_an_avro_string_is_poison_of_its_class() -> None:
    schema = json.dumps({"type": "record", "name": "Envelope", "fields": [{"name": "op", "type": "string"}]})
    with registry_answering(schema) as (registry, _):
        value = b"\x00\x00\x00\x00\x09\x06\xed\xa0\x80"  # a surrogate, as CESU-8 writes it
        assert poison_class(value, registry) == "invalid_utf8"
