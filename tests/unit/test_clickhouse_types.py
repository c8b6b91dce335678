"""Column types read alike by both lanes (consumer/transform/clickhouse_types.py)."""

from __future__ import annotations

import datetime as dt

from consumer.core.types import ChangeEvent
from consumer.transform.clickhouse_types import (
    DATETIME64_MAX,
    DATETIME64_MAX_US,
    DATETIME64_MIN,
    DATETIME64_MIN_US,
    EPOCH,
    converter_for,
    decimal_parameters,
    unwrap,
)
from consumer.transform.mapping import ColumnMapping, Mapper, Mapping, TableMapping


def test_datetime64_range_in_both_forms_and_in_whole_years() -> None:
    assert EPOCH + dt.timedelta(microseconds=DATETIME64_MIN_US) == DATETIME64_MIN
    assert EPOCH + dt.timedelta(microseconds=DATETIME64_MAX_US) == DATETIME64_MAX
    # The ClickHouse lane checks the range of Debezium's timestamp text by its year alone.
    assert dt.datetime(DATETIME64_MIN.year, 1, 1, tzinfo=dt.UTC) == DATETIME64_MIN
    assert DATETIME64_MAX + dt.timedelta(microseconds=1) == dt.datetime(DATETIME64_MAX.year + 1, 1, 1, tzinfo=dt.UTC)


def test_wrappers_and_decimal_parameters() -> None:
    assert unwrap(" LowCardinality(Nullable(String)) ") == ("String", True)
    assert unwrap("LowCardinality(String)") == ("String", False)
    assert unwrap("Nullable(Decimal(12, 6))") == ("Decimal(12, 6)", True)
    assert decimal_parameters("Decimal(12, 6)") == (12, 6)
    assert decimal_parameters("Decimal(12,6)") == (12, 6)
    assert decimal_parameters("Decimal256(6)") is None
    assert decimal_parameters("Nullable(Decimal(12, 6))") is None


def test_a_low_cardinality_nullable_column_takes_null_in_the_python_lane_too() -> None:
    columns = tuple(
        ColumnMapping(name, clickhouse_type, name, *converter_for(clickhouse_type))
        for name, clickhouse_type in (("id", "Int64"), ("channel", "LowCardinality(Nullable(String))"))
    )
    table = TableMapping("fact_visits", "adtech.public.visits", "fact", ("id",), columns)
    event = ChangeEvent("c", "visits", None, {"id": 1, "channel": None}, 10, 0, False)
    assert Mapper(Mapping((table,))).rows(table, event, tiebreak=0) == [(1, None, 1)]
