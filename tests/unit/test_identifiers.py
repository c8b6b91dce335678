"""Names reaching SQL are identifiers (consumer/core/identifiers.py), types come from an
allow-list (canonical_type), and schema evolution neither runs what a column name carries nor
adds columns without end. SQL cases run on an embedded ClickHouse (chDB) through the real
pipeline: decoder, mapper and sink."""

from __future__ import annotations

import json

import pytest

from consumer.core.identifiers import BadIdentifier, check_identifier, quote
from consumer.decode.envelope import EnvelopeDecoder
from consumer.sink.clickhouse import ClickHouseSink, connect
from consumer.sink.migrate import apply_migrations
from consumer.transform.clickhouse_types import canonical_type
from consumer.transform.mapping import Mapper, load_mapping
from tests.fakes import LogSource, log_pipeline, run_until_committed

ADVERTISERS = "adtech.public.advertiser"
# The column names of issue 14 that emptied dim_advertiser and dropped its `name` column.
INJECTIONS = ["b` String, DELETE WHERE 1 --", "x` String, DROP COLUMN name --"]


@pytest.mark.parametrize(
    "name", ["id", "_version", "Camel_Case9", "a" * 63, "_"], ids=lambda n: n if len(n) < 10 else f"{len(n)} chars"
)
def test_identifiers_pass_and_are_quoted(name) -> None:
    assert check_identifier(name, "column") == name
    assert quote(name) == f"`{name}`"


@pytest.mark.parametrize(
    "name",
    [*INJECTIONS, "", "9lives", "a" * 64, "naïve", "a b", "a-b", "a`b", "a.b", "a;b", "a\nb", "$x", 7, None],
)
def test_anything_else_is_refused(name) -> None:
    with pytest.raises(BadIdentifier, match="not an identifier"):
        check_identifier(name, "column")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("Int64", "Int64"),
        ("UInt256", "UInt256"),
        (" Nullable(Decimal(12,6)) ", "Nullable(Decimal(12, 6))"),
        ("LowCardinality(Nullable(String))", "LowCardinality(Nullable(String))"),
        ("DateTime64(6, 'UTC')", "DateTime64(6, 'UTC')"),
        ("DateTime64( 3 )", "DateTime64(3)"),
        ("DateTime('Europe/Berlin')", "DateTime('Europe/Berlin')"),
        ("FixedString(16)", "FixedString(16)"),
        ("Date32", "Date32"),
    ],
)
def test_allowed_types_are_written_one_way(text, canonical) -> None:
    assert canonical_type(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "String DEFAULT 'x'",
        "String, DROP COLUMN name",
        "DateTime64(6, 'UTC'); DROP TABLE dim_advertiser",
        "DateTime64(6, 'UTC') --",
        "Float64 CODEC(ZSTD)",
        "FixedString(0)",
        "Decimal(77, 2)",
        "Decimal(5, 6)",
        "Nullable(Nullable(String))",
        "Nullable(LowCardinality(String))",
        "Array(String)",
        "DateTime('UTC'')",
        "Money",
    ],
)
def test_other_types_are_refused(text) -> None:
    with pytest.raises(ValueError, match="unsupported column type"):
        canonical_type(text)


def mapping_file(tmp_path, table="dim_x", column="id", key="id", column_type="Int64"):
    path = tmp_path / "mapping.toml"
    path.write_text(
        f'[tables.{json.dumps(table)}]\ntopic = "t"\nrole = "dimension"\nkey = [{json.dumps(key)}]\n'
        f"columns = {{ {json.dumps(column)} = {json.dumps(column_type)} }}\n"
    )
    return path


@pytest.mark.parametrize(
    ("where", "spec", "message"),
    [
        ("table", {"table": "dim_x; DROP TABLE t"}, "table name 'dim_x; DROP TABLE t' is not an identifier"),
        ("column", {"column": INJECTIONS[1], "key": INJECTIONS[1]}, "column name"),
        ("key", {"key": "id`"}, "key column name 'id`' is not an identifier"),
        ("type", {"column_type": "Int64, DROP COLUMN name"}, "column id: unsupported column type"),
    ],
)
def test_the_mapping_file_fails_fast_on_names_and_types(tmp_path, where, spec, message) -> None:
    with pytest.raises(ValueError, match=r"mapping .*mapping\.toml, table") as error:
        load_mapping(mapping_file(tmp_path, **spec))
    assert message in str(error.value), where


@pytest.fixture
def clickhouse(tmp_path):
    client = connect(None, embedded_path=tmp_path / "chdb")
    apply_migrations(client)
    yield client
    client.close()


def advertiser_change(advertiser_id: int, lsn: int, **extra) -> bytes:
    after = {
        "id": advertiser_id,
        "name": f"advertiser {advertiser_id}",
        "created_at": "2026-11-27T12:00:00.000000Z",
        "updated_at": "2026-11-27T12:00:00.000000Z",
        **extra,
    }
    source = {"table": "advertiser", "lsn": lsn, "ts_ms": 1_800_000_000_000}
    return json.dumps({"op": "c", "before": None, "after": after, "source": source}).encode()


def advertisers_state(clickhouse) -> tuple[list, list]:
    columns = clickhouse.query(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'dim_advertiser' "
        "ORDER BY position"
    ).result_rows
    rows = clickhouse.query("SELECT id, name FROM dim_advertiser FINAL WHERE _is_deleted = 0 ORDER BY id").result_rows
    return columns, rows


def run(clickhouse, values: list[bytes], partition: int = 0, **config):
    """The values as a partition's log (a partition of its own per run: ClickHouse's applied
    watermark would skip offsets it holds)."""
    source = LogSource({(ADVERTISERS, partition): values})
    pipeline = log_pipeline(
        source, EnvelopeDecoder(None), ClickHouseSink(clickhouse), poison_breaker_min_messages=0, **config
    )
    run_until_committed(pipeline, source)
    return pipeline


def test_injected_column_names_are_dead_lettered_and_dim_advertiser_is_untouched(clickhouse) -> None:
    run(clickhouse, [advertiser_change(i, 100 + i) for i in range(1, 4)])
    before = advertisers_state(clickhouse)
    assert len(before[1]) == 3 and ("name", "String") in before[0]

    hostile = [advertiser_change(9, 200 + n, **{name: "x"}) for n, name in enumerate(INJECTIONS)]
    pipeline = run(clickhouse, [advertiser_change(4, 150), *hostile], partition=1)

    assert [(r["offset"], r["error_class"]) for r in pipeline.dlq.sent] == [
        (1, "bad_identifier"),
        (2, "bad_identifier"),
    ]
    assert all("not an identifier" in r["reason"] for r in pipeline.dlq.sent)
    columns, rows = advertisers_state(clickhouse)
    assert columns == before[0], "no column added or dropped"
    assert rows == [*before[1], (4, "advertiser 4")], "no row deleted, none of the hostile changes applied"


def test_a_valid_new_column_is_still_added(clickhouse) -> None:
    run(clickhouse, [advertiser_change(1, 100, priority=3)])
    columns, _ = advertisers_state(clickhouse)
    assert ("priority", "Nullable(Int64)") in columns
    assert clickhouse.query("SELECT priority FROM dim_advertiser FINAL").result_rows == [(3,)]


def test_evolution_adds_at_most_the_configured_columns_to_a_table(clickhouse) -> None:
    values = [advertiser_change(i, 100 + i, **{f"extra_{i}": i}) for i in range(1, 5)]
    pipeline = run(clickhouse, values, max_evolved_columns=2)
    assert [(r["offset"], r["error_class"]) for r in pipeline.dlq.sent] == [
        (2, "too_many_new_columns"),
        (3, "too_many_new_columns"),
    ]
    columns, rows = advertisers_state(clickhouse)
    assert [c for c, _ in columns if c.startswith("extra_")] == ["extra_1", "extra_2"]
    assert [r[0] for r in rows] == [1, 2]
    # Counted in ClickHouse: a consumer started afresh (a new pipeline, a new mapper) adds no more.
    pipeline = run(clickhouse, [advertiser_change(5, 105, extra_5=5)], partition=1, max_evolved_columns=2)
    assert [r["error_class"] for r in pipeline.dlq.sent] == ["too_many_new_columns"]


def test_a_new_column_with_more_decimal_places_than_clickhouse_holds_is_poison(clickhouse) -> None:
    before = advertisers_state(clickhouse)
    wide = advertiser_change(1, 100).replace(b'"id": 1,', b'"id": 1, "rate": 0.' + b"1" * 39 + b",")
    pipeline = run(clickhouse, [wide, advertiser_change(2, 101)])
    assert [(r["offset"], r["error_class"]) for r in pipeline.dlq.sent] == [(0, "decimal_scale_out_of_range")]
    columns, rows = advertisers_state(clickhouse)
    assert columns == before[0] and [r[0] for r in rows] == [2]


def test_the_mapper_checks_both_images() -> None:
    from consumer.core.errors import MappingError
    from consumer.core.types import ChangeEvent

    mapping = load_mapping()
    table = mapping.for_topic(ADVERTISERS)
    image = {"id": 1, "name": "a", "created_at": None, "updated_at": None}
    delete = ChangeEvent("d", "advertiser", {**image, INJECTIONS[0]: 1}, None, 5, 0, False)
    with pytest.raises(MappingError) as error:
        Mapper(mapping).rows(table, delete, 1)
    assert error.value.error_class == "bad_identifier"


def test_a_column_another_consumer_added_keeps_its_type(clickhouse) -> None:
    """Found by the fuzz suite: a column added as String by an earlier consumer, then met with an
    integer by a consumer started afresh, was inserted as Int64 into the String column, and
    retried for ever."""
    run(clickhouse, [advertiser_change(1, 100, tier="gold")])
    run(clickhouse, [advertiser_change(2, 101, tier=7)], partition=1)
    rows = clickhouse.query("SELECT id, tier FROM dim_advertiser FINAL ORDER BY id").result_rows
    assert rows == [(1, "gold"), (2, "7")]
