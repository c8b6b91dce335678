"""MAP stage: change events become versioned dimension rows and signed fact rows."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from consumer.core.errors import MappingError
from consumer.core.types import UNCHANGED_TOAST, ChangeEvent
from consumer.transform.mapping import KEEP_PREVIOUS, Mapper, load_mapping, row_version

MAPPING = load_mapping()
MAPPER = Mapper(MAPPING)
IMPRESSIONS = MAPPING.for_topic("adtech.public.impressions")
CAMPAIGNS = MAPPING.for_topic("adtech.public.campaign")
T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def impression(id_: int, cost: str, campaign: int = 7) -> dict:
    return {"id": id_, "campaign_id": campaign, "created_at": T0, "cost": Decimal(cost)}


def campaign(id_: int, **changes) -> dict:
    row = {
        "id": id_,
        "advertiser_id": 3,
        "name": "spring",
        "bid_amount": Decimal("1.2500"),
        "budget": Decimal("1000.00"),
        "status": "active",
        "creative": "<div>…</div>",
        "created_at": T0,
        "updated_at": T0,
    }
    return {**row, **changes}


def event(op: str, before=None, after=None, table="impressions", lsn=100) -> ChangeEvent:
    return ChangeEvent(op=op, table=table, before=before, after=after, lsn=lsn, commit_ts_ms=0, snapshot=op == "r")


def test_fact_insert_and_snapshot_are_one_positive_row() -> None:
    for op in ("c", "r"):
        (row,) = MAPPER.rows(IMPRESSIONS, event(op, after=impression(1, "0.001000")), tiebreak=5)
        assert row == (1, 7, T0, Decimal("0.001000"), 1)


def test_fact_update_retracts_the_old_image_and_adds_the_new() -> None:
    rows = MAPPER.rows(
        IMPRESSIONS,
        event("u", impression(1, "0.001000", campaign=7), impression(1, "0.002500", campaign=8)),
        tiebreak=6,
    )
    assert rows == [(1, 7, T0, Decimal("0.001000"), -1), (1, 8, T0, Decimal("0.002500"), 1)]
    assert sum(r[-1] * r[3] for r in rows) == Decimal("0.001500")


def test_fact_delete_is_one_negative_row() -> None:
    assert MAPPER.rows(IMPRESSIONS, event("d", before=impression(1, "0.001000")), 7) == [
        (1, 7, T0, Decimal("0.001000"), -1)
    ]


def test_fact_update_without_full_before_image_is_refused() -> None:
    with pytest.raises(MappingError) as err:
        MAPPER.rows(IMPRESSIONS, event("u", before=None, after=impression(1, "0.1")), 1)
    assert err.value.error_class == "missing_before_image"


def test_dimension_rows_are_versioned_by_lsn_then_offset() -> None:
    (row,) = MAPPER.rows(CAMPAIGNS, event("u", after=campaign(4, name="autumn"), table="campaign", lsn=900), 42)
    assert row[2] == "autumn" and row[-2] == row_version(900, 42) and row[-1] == 0
    assert row_version(900, 42) < row_version(900, 43) < row_version(901, 0)


def test_dimension_delete_keeps_the_key_and_marks_deleted() -> None:
    (row,) = MAPPER.rows(CAMPAIGNS, event("d", before={"id": 4}, table="campaign"), 9)
    assert row[0] == 4 and row[-1] == 1


def test_unchanged_toast_keeps_the_previous_value_in_dimensions_only() -> None:
    (row,) = MAPPER.rows(CAMPAIGNS, event("u", after=campaign(4, creative=UNCHANGED_TOAST), table="campaign"), 1)
    assert row[6] is KEEP_PREVIOUS
    with pytest.raises(MappingError) as err:
        MAPPER.rows(IMPRESSIONS, event("c", after={**impression(1, "0.1"), "cost": UNCHANGED_TOAST}), 1)
    assert err.value.error_class == "unchanged_toast_in_fact"


@pytest.mark.parametrize(
    ("cost", "error_class"),
    [("0.0000001", "decimal_scale_exceeded"), ("1234567.000000", "decimal_out_of_range"), (0.5, "bad_value")],
)
def test_decimals_are_exact_or_refused(cost, error_class) -> None:
    value = Decimal(cost) if isinstance(cost, str) else cost
    with pytest.raises(MappingError) as err:
        MAPPER.rows(IMPRESSIONS, event("c", after={**impression(1, "0"), "cost": value}), 1)
    assert err.value.error_class == error_class


def test_decimal_with_a_smaller_scale_is_widened_exactly() -> None:
    (row,) = MAPPER.rows(IMPRESSIONS, event("c", after={**impression(1, "0"), "cost": Decimal("1.5")}), 1)
    assert row[3] == Decimal("1.500000") and row[3].as_tuple().exponent == -6


def test_timestamp_outside_clickhouse_range_is_refused() -> None:
    late = dt.datetime(2400, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(MappingError) as err:
        MAPPER.rows(IMPRESSIONS, event("c", after={**impression(1, "0"), "created_at": late}), 1)
    assert err.value.error_class == "datetime_out_of_range"


def test_json_without_schema_values_are_converted_by_column_type() -> None:
    after = {"id": "12", "campaign_id": 7, "created_at": "2026-11-27T12:00:00.000000Z", "cost": "0.000100"}
    (row,) = MAPPER.rows(IMPRESSIONS, event("c", after=after), 1)
    assert row == (12, 7, T0, Decimal("0.000100"), 1)


def test_truncate_is_dead_lettered_by_default() -> None:
    with pytest.raises(MappingError) as err:
        MAPPER.rows(IMPRESSIONS, event("t"), 1)
    assert err.value.error_class == "truncate"


def test_mapping_file_errors_name_the_table(tmp_path) -> None:
    bad = tmp_path / "m.toml"
    bad.write_text('[tables.x]\ntopic = "t"\nrole = "fact"\ncolumns = { id = "Int64", v = "Money" }\n')
    with pytest.raises(ValueError, match="table x, column v"):
        load_mapping(bad)


def test_a_nullable_column_missing_from_an_older_event_is_null() -> None:
    from consumer.transform.mapping import infer_column

    widened = CAMPAIGNS.with_columns([infer_column("priority", 3)])
    (row,) = MAPPER.rows(widened, event("u", after=campaign(4), table="campaign"), 1)
    assert row[len(CAMPAIGNS.columns)] is None
    (row,) = MAPPER.rows(widened, event("u", after={**campaign(4), "priority": 3}, table="campaign"), 2)
    assert row[len(CAMPAIGNS.columns)] == 3
