"""The ClickHouse star schema (clickhouse/*.sql), its migration runner and the ground-truth check.

Needs a ClickHouse and a Postgres; the addresses come from the environment:

* ``CDC_CLICKHOUSE_URL``: e.g. ``http://127.0.0.1:38123``, or ``chdb:///tmp/some-dir`` for an
  in-process chDB engine;
* ``CDC_POSTGRES_DSN``: e.g. ``host=/tmp port=35432 dbname=adtech user=postgres``.

Each test gets its own ClickHouse database and its own Postgres schema (the source tables of
postgres/schema.sql without the publication), both dropped afterwards. The ClickHouse rows are
written the way the consumer writes them: signed fact rows (+1 insert, -1/+1 update, -1 delete)
and dimension versions with a growing ``_version``, all with Kafka coordinates.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import clickhouse_connect
import psycopg
import pytest

from cdc_dev import verify
from consumer.sink.migrate import (
    DEFAULT_DIRECTORY,
    MigrationChecksumError,
    applied_offsets,
    apply_migrations,
    discover,
    split_statements,
)

REPO = Path(__file__).resolve().parent.parent
KPI_VIEWS = {
    "kpi_campaign_ctr": ["campaign_id", "campaign_name", "advertiser_name", "impressions", "clicks", "ctr"],
    "kpi_daily_performance": ["event_date", "impressions", "clicks", "ctr", "spend"],
    "kpi_campaign_daily": ["campaign_id", "event_date", "impressions", "clicks", "ctr", "spend"],
    "kpi_cost_efficiency": ["campaign_id", "spend", "budget", "budget_used", "cpm", "cpc"],
    "kpi_advertiser_overview": [
        "advertiser_id",
        "advertiser_name",
        "campaigns",
        "impressions",
        "clicks",
        "ctr",
        "spend",
    ],
}
SYNC = {"async_insert": 0}

T_ADV, T_CMP = "adtech.public.advertiser", "adtech.public.campaign"
T_IMP, T_CLK = "adtech.public.impressions", "adtech.public.clicks"


pytestmark = [pytest.mark.stack]


# --------------------------------------------------------------------------------------------------
# Fixtures (tests/conftest.py already exists and is about the whole stack, so they live here)


@pytest.fixture(scope="session")
def clickhouse_url(stack) -> str:
    return stack.clickhouse_url


@pytest.fixture(scope="session")
def postgres_dsn(stack) -> str:
    return stack.postgres_dsn


@pytest.fixture
def ch(clickhouse_url: str) -> Iterator[Any]:
    """A client whose current database is a fresh, unique database (dropped afterwards)."""
    database = f"test_cdc_schema_{uuid.uuid4().hex[:12]}"
    admin = clickhouse_connect.get_client(dsn=clickhouse_url)
    admin.command(f"CREATE DATABASE {database}")
    client = clickhouse_connect.get_client(dsn=clickhouse_url, database=database)
    try:
        yield client
    finally:
        client.close()
        admin.command(f"DROP DATABASE IF EXISTS {database} SYNC")
        admin.close()


@pytest.fixture
def pg(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    """A connection whose search_path is a fresh schema holding the source tables."""
    schema = f"test_cdc_schema_{uuid.uuid4().hex[:12]}"
    ddl = (REPO / "postgres" / "schema.sql").read_text()
    # Only the tables: the publication is the real stack's business (and is database-wide).
    ddl = re.sub(r"\bDO\s+\$\$.*?\$\$\s*;", "", ddl, flags=re.DOTALL)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        with psycopg.connect(postgres_dsn, autocommit=True, options=f"-c search_path={schema}") as conn:
            conn.execute(ddl)
            yield conn
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def schema(ch: Any) -> Any:
    apply_migrations(ch)
    return ch


# --------------------------------------------------------------------------------------------------
# Writing rows the way the consumer does


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@dataclass
class Writer:
    """Assigns Kafka offsets (one partition per topic) and LSNs like a live pipeline would."""

    ch: Any
    offsets: dict[str, int] = field(default_factory=dict)
    lsn: int = 0x1_0000_0000

    def _next(self, topic: str) -> tuple[int, int]:
        self.offsets[topic] = self.offsets.get(topic, -1) + 1
        self.lsn += 0x100
        return self.offsets[topic], self.lsn

    def dim(self, table: str, topic: str, row: dict[str, Any], deleted: bool = False) -> None:
        offset, lsn = self._next(topic)
        row = {**row, "_version": (lsn << 64) | offset, "_is_deleted": int(deleted)}
        row.update(_topic=topic, _partition=0, _offset=offset)
        self.ch.insert(table, [list(row.values())], column_names=list(row), settings=SYNC)

    def fact(
        self,
        table: str,
        topic: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        token: str | None = None,
        offset: int | None = None,
    ) -> None:
        """One change event: -1 of the before-image and/or +1 of the after-image."""
        if offset is None:
            offset, _ = self._next(topic)
        rows = [{**img, "_sign": sign} for img, sign in ((before, -1), (after, 1)) if img is not None]
        self.facts(table, topic, [(offset, r) for r in rows], token)

    def facts(self, table: str, topic: str, rows: list[tuple[int, dict[str, Any]]], token: str | None) -> None:
        columns = [*rows[0][1], "_topic", "_partition", "_offset"]
        data = [[*r.values(), topic, 0, offset] for offset, r in rows]
        settings = dict(SYNC)
        if token:
            settings["insert_deduplication_token"] = token
        self.ch.insert(table, data, column_names=columns, settings=settings)


def pg_insert(conn: psycopg.Connection, table: str, row: dict[str, Any]) -> None:
    cols = ", ".join(row)
    marks = ", ".join(["%s"] * len(row))
    conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values()))


CREATIVE = "<div class='ad'>" + "x" * 3000 + "</div>"
ADV = {
    1: {"id": 1, "name": "Acme Corp", "created_at": ts("2024-01-01 10:00:00.123456+00:00")},
    2: {"id": 2, "name": "Globex", "created_at": ts("2024-01-02 10:00:00+00:00")},
    4: {"id": 4, "name": "Hooli (no campaigns)", "created_at": ts("2024-01-04 10:00:00+00:00")},
}
CMP = {
    10: {
        "id": 10,
        "advertiser_id": 1,
        "name": "Spring",
        "bid_amount": Decimal("0.5000"),
        "budget": Decimal("1000.00"),
        "status": "active",
        "creative": CREATIVE,
        "created_at": ts("2024-02-01 00:00:00+00:00"),
    },
    11: {
        "id": 11,
        "advertiser_id": 2,
        "name": "Summer (moved to Globex, no budget)",
        "bid_amount": Decimal("1.2500"),
        "budget": Decimal("0.00"),
        "status": "paused",
        "creative": "",
        "created_at": ts("2024-02-02 00:00:00+00:00"),
    },
    12: {
        "id": 12,
        "advertiser_id": 1,
        "name": "Zero traffic",
        "bid_amount": Decimal("0.1000"),
        "budget": Decimal("50.00"),
        "status": "archived",
        "creative": "z",
        "created_at": ts("2024-02-03 00:00:00+00:00"),
    },
}


def imp(id_: int, campaign: int, at: str, cost: str) -> dict[str, Any]:
    return {"id": id_, "campaign_id": campaign, "created_at": ts(at), "cost": Decimal(cost)}


def clk(id_: int, impression: int, campaign: int, at: str, cost: str) -> dict[str, Any]:
    return {
        "id": id_,
        "impression_id": impression,
        "campaign_id": campaign,
        "created_at": ts(at),
        "cost": Decimal(cost),
    }


def with_updated_at(row: dict[str, Any], at: str | None = None) -> dict[str, Any]:
    return {**row, "updated_at": ts(at) if at else row["created_at"]}


def build_scenario(ch: Any, pg: psycopg.Connection) -> Writer:
    """The history in ClickHouse, and its end state in Postgres."""
    w = Writer(ch)
    # advertiser 1: created as "Acme", renamed (higher version); 3 created then deleted; 2 and 4 plain.
    w.dim("dim_advertiser", T_ADV, with_updated_at({**ADV[1], "name": "Acme"}))
    w.dim("dim_advertiser", T_ADV, with_updated_at(ADV[2]))
    w.dim("dim_advertiser", T_ADV, with_updated_at({"id": 3, "name": "Initech", "created_at": ts("2024-01-03")}))
    w.dim("dim_advertiser", T_ADV, with_updated_at(ADV[4]))
    w.dim("dim_advertiser", T_ADV, with_updated_at(ADV[1], "2024-03-01 08:00:00.654321+00:00"))
    w.dim(
        "dim_advertiser",
        T_ADV,
        {"id": 3, "name": "", "created_at": ts("1970-01-01"), "updated_at": ts("1970-01-01")},
        deleted=True,
    )
    # campaigns: 11 starts under advertiser 1 and moves to 2; 13 is created, gets traffic, is deleted.
    w.dim("dim_campaign", T_CMP, with_updated_at(CMP[10]))
    w.dim("dim_campaign", T_CMP, with_updated_at({**CMP[11], "advertiser_id": 1, "name": "Summer"}))
    w.dim("dim_campaign", T_CMP, with_updated_at(CMP[12]))
    doomed = {**CMP[12], "id": 13, "name": "Doomed"}
    w.dim("dim_campaign", T_CMP, with_updated_at(doomed))
    w.dim("dim_campaign", T_CMP, with_updated_at(CMP[11], "2024-03-02 09:00:00+00:00"))

    # impressions (UTC day and month boundaries on purpose)
    i100 = imp(100, 10, "2024-03-31 23:30:00+00:00", "0.001000")
    i101 = imp(101, 10, "2024-04-01 00:10:00+00:00", "0.002000")
    i102 = imp(102, 11, "2024-04-01 22:30:00-05:00", "0.001500")  # 2024-04-02 UTC
    i103_old = imp(103, 10, "2024-04-01 12:00:00+00:00", "0.003000")
    i103 = imp(103, 10, "2024-04-02 12:00:00.000001+00:00", "0.003500")
    i104 = imp(104, 10, "2024-04-01 13:00:00+00:00", "0.004000")
    i105 = imp(105, 13, "2024-04-01 14:00:00+00:00", "0.005000")
    for row in (i100, i101, i102, i103_old, i104, i105):
        w.fact("fact_impressions", T_IMP, None, row)
    w.fact("fact_impressions", T_IMP, i103_old, i103)  # update: -1 before, +1 after
    w.fact("fact_impressions", T_IMP, i104, None)  # delete

    c500 = clk(500, 100, 10, "2024-04-01 00:00:05+00:00", "0.250000")
    c501_old = clk(501, 102, 11, "2024-04-02 03:31:00+00:00", "0.300000")
    c501 = clk(501, 102, 11, "2024-04-02 03:31:00+00:00", "0.350000")
    c502 = clk(502, 101, 10, "2024-04-01 00:11:00+00:00", "0.200000")
    c503 = clk(503, 105, 13, "2024-04-01 14:00:01+00:00", "0.100000")
    for row in (c500, c501_old, c502, c503):
        w.fact("fact_clicks", T_CLK, None, row)
    w.fact("fact_clicks", T_CLK, c501_old, c501)
    w.fact("fact_clicks", T_CLK, c502, None)
    # campaign 13 deleted: Postgres cascades to its facts, which arrive as deletes
    w.fact("fact_clicks", T_CLK, c503, None)
    w.fact("fact_impressions", T_IMP, i105, None)
    w.dim("dim_campaign", T_CMP, {"id": 13, "status": "active"}, deleted=True)

    # Postgres: the end state
    for row in ADV.values():
        pg_insert(
            pg, "advertiser", with_updated_at(row, "2024-03-01 08:00:00.654321+00:00" if row["id"] == 1 else None)
        )
    for row in CMP.values():
        pg_insert(pg, "campaign", with_updated_at(row, "2024-03-02 09:00:00+00:00" if row["id"] == 11 else None))
    for row in (i100, i101, i102, i103):
        pg_insert(pg, "impressions", row)
    for row in (c500, c501):
        pg_insert(pg, "clicks", row)
    return w


# --------------------------------------------------------------------------------------------------
# Tests without a database


def test_split_statements_only_at_line_ending_semicolons() -> None:
    sql = """
    -- a comment; with a semicolon;
    CREATE TABLE a (s String DEFAULT 'x;
    y;') ENGINE = Memory;   -- trailing comment
    /* block;
    comment; */
    SELECT 'it''s;', "q;", `b;` ; SELECT 2;
    -- only a comment at the end;
    """
    statements = split_statements(sql)
    assert len(statements) == 2, statements
    assert statements[0].endswith("ENGINE = Memory")
    assert "'x;\n    y;'" in statements[0]
    assert statements[1].startswith("/* block;") and statements[1].endswith("SELECT 2")


def test_repository_migrations_are_ordered_and_split() -> None:
    migrations = discover()
    assert [m.name for m in migrations] == [
        "001_dimensions.sql",
        "002_facts.sql",
        "003_kpi_aggregates.sql",
        "004_kpi_views.sql",
        "005_offset_audit.sql",
    ]
    assert Path(str(DEFAULT_DIRECTORY)).resolve() == REPO / "clickhouse"  # consumer/migrations links there
    assert [len(m.statements) for m in migrations] == [2, 2, 3, 5, 11]


# --------------------------------------------------------------------------------------------------
# Schema


def test_migrations_apply_once(ch: Any) -> None:
    assert apply_migrations(ch) == [m.name for m in discover()]
    assert apply_migrations(ch) == []
    recorded = ch.query("SELECT name, checksum FROM _cdc_schema_migrations FINAL ORDER BY name").result_rows
    assert [(name, digest) for name, digest in recorded] == [(m.name, m.checksum) for m in discover()]

    for view, columns in KPI_VIEWS.items():
        described = [row[0] for row in ch.query(f"DESCRIBE TABLE {view}").result_rows]
        assert described == columns, view
    for table in ("dim_advertiser", "dim_campaign", "fact_impressions", "fact_clicks", "agg_campaign_daily"):
        window = ch.query(
            "SELECT extract(create_table_query, 'non_replicated_deduplication_window = (\\\\d+)') "
            "FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            parameters={"t": table},
        ).result_rows[0][0]
        assert window == "1000", table


def test_changed_migration_is_an_error_and_new_files_apply(ch: Any, tmp_path: Path) -> None:
    directory = tmp_path / "clickhouse"
    shutil.copytree(DEFAULT_DIRECTORY, directory)
    apply_migrations(ch, directory)
    (directory / "006_campaign_landing_url.sql").write_text(
        "-- a later Postgres column\nALTER TABLE dim_campaign ADD COLUMN IF NOT EXISTS landing_url String DEFAULT '';\n"
    )
    assert apply_migrations(ch, directory) == ["006_campaign_landing_url.sql"]
    assert apply_migrations(ch, directory) == []
    with (directory / "002_facts.sql").open("a") as f:
        f.write("\n-- edited after it was applied\n")
    with pytest.raises(MigrationChecksumError, match=r"002_facts\.sql"):
        apply_migrations(ch, directory)


def test_watermark_query_uses_the_projection(schema: Any) -> None:
    w = Writer(schema)
    rows = [(offset, imp(offset, 10, "2024-04-01 00:00:00+00:00", "0.1")) for offset in range(5)]
    w.facts("fact_impressions", T_IMP, [(o, {**r, "_sign": 1}) for o, r in rows], None)
    w.facts("fact_impressions", T_IMP, [(7, {**imp(9, 11, "2024-05-01 00:00:00+00:00", "0.1"), "_sign": 1})], None)
    w.facts(
        "fact_impressions", "other.topic", [(99, {**imp(99, 11, "2024-05-01 00:00:00+00:00", "0.1"), "_sign": 1})], None
    )
    assert applied_offsets(schema, "fact_impressions", T_IMP) == {0: 7}
    assert applied_offsets(schema, "fact_clicks", T_CLK) == {}
    query = "SELECT _partition, max(_offset) FROM fact_impressions WHERE _topic = {t:String} GROUP BY _partition"
    plan = "\n".join(r[0] for r in schema.query(f"EXPLAIN {query}", parameters={"t": T_IMP}).result_rows)
    assert "offset_digests" in plan, plan
    forced = schema.query(query, parameters={"t": T_IMP}, settings={"force_optimize_projection": 1})
    assert forced.result_rows == [(0, 7)]
    with pytest.raises(ValueError):
        applied_offsets(schema, "fact_impressions; DROP TABLE x", T_IMP)


# --------------------------------------------------------------------------------------------------
# Ground truth


def test_scenario_matches_postgres(schema: Any, pg: psycopg.Connection) -> None:
    w = build_scenario(schema, pg)
    report = verify.compare(pg, schema)
    assert report.ok, report
    assert report.section("kpi_campaign_ctr").compared == 3
    assert report.section("dim_campaign").compared == 3
    assert report.section("kpi_campaign_daily").compared == 4

    ctr = {r[0]: r[1:] for r in schema.query("SELECT * FROM kpi_campaign_ctr").result_rows}
    assert ctr[11] == ("Summer (moved to Globex, no budget)", "Globex", 1, 1, 1.0)
    assert ctr[12][2:] == (0, 0, 0.0)
    eff = {r[0]: r[1:] for r in schema.query("SELECT * FROM kpi_cost_efficiency").result_rows}
    assert eff[11][2] is None and eff[12][2:] == (0.0, None, None)
    overview = {r[0]: r[2] for r in schema.query("SELECT * FROM kpi_advertiser_overview").result_rows}
    assert overview == {1: 2, 2: 1, 4: 0}

    counts = verify.totals(pg, schema)
    assert counts["impressions"].postgres == counts["impressions"].clickhouse == 4
    assert counts["impressions"].clickhouse_aggregate == 4
    assert counts["clicks"].clickhouse == 2 and counts["clicks"].clickhouse_rows == 8
    assert counts["advertiser"].clickhouse == 3 and counts["campaign"].clickhouse == 3
    assert all(t.lost == t.double_counted == 0 for t in counts.values()), counts

    assert applied_offsets(schema, "fact_impressions", T_IMP) == {0: w.offsets[T_IMP]}
    assert applied_offsets(schema, "dim_campaign", T_CMP) == {0: w.offsets[T_CMP]}

    # Merges change nothing (SummingMergeTree drops all-zero rows, ReplacingMergeTree old versions).
    for table in ("dim_advertiser", "dim_campaign", "fact_impressions", "fact_clicks", "agg_campaign_daily"):
        schema.command(f"OPTIMIZE TABLE {table} FINAL")
    report = verify.compare(pg, schema)
    assert report.ok, report


def test_extra_fact_row_is_reported(schema: Any, pg: psycopg.Connection) -> None:
    w = build_scenario(schema, pg)
    w.fact("fact_impressions", T_IMP, None, imp(999, 10, "2024-04-02 10:00:00+00:00", "0.000100"))
    report = verify.compare(pg, schema)
    assert not report.ok
    assert {"kpi_campaign_ctr", "kpi_daily_performance", "kpi_campaign_daily"} <= set(report.failed)
    assert "agg_campaign_daily vs facts" not in report.failed  # the aggregate does follow the facts
    text = str(report)
    assert "MISMATCH" in text and "kpi_campaign_ctr: FAILED" in text
    mismatch = report.section("kpi_campaign_ctr").mismatches[0]
    assert (mismatch.key, mismatch.column, mismatch.expected, mismatch.actual) == ((10,), "impressions", 3, 4)
    assert verify.totals(pg, schema)["impressions"].double_counted == 1


def test_new_postgres_column_is_compared_once_added(schema: Any, pg: psycopg.Connection) -> None:
    build_scenario(schema, pg)
    pg.execute("ALTER TABLE campaign ADD COLUMN landing_url text NOT NULL DEFAULT ''")
    report = verify.compare(pg, schema)
    assert report.failed == ["dim_campaign"]
    assert "Postgres columns missing in ClickHouse: landing_url" in str(report)
    schema.command("ALTER TABLE dim_campaign ADD COLUMN IF NOT EXISTS landing_url String DEFAULT ''")
    report = verify.compare(pg, schema)
    assert report.ok, report


def test_retried_insert_with_same_token_changes_no_kpi(schema: Any, pg: psycopg.Connection) -> None:
    w = build_scenario(schema, pg)
    # One batch of two messages spanning two months (so two parts), as the consumer would send it.
    batch = [
        (w._next(T_IMP)[0], {**imp(106, 10, "2024-04-30 23:59:59+00:00", "0.000700"), "_sign": 1}),
        (w._next(T_IMP)[0], {**imp(107, 12, "2024-05-01 00:00:00+00:00", "0.000900"), "_sign": 1}),
    ]
    token = f"{T_IMP}-0-{batch[0][0]}-{batch[-1][0]}"
    w.facts("fact_impressions", T_IMP, batch, token)
    for _, row in batch:
        pg_insert(pg, "impressions", {k: v for k, v in row.items() if k != "_sign"})

    def snapshot() -> dict[str, list[tuple]]:
        return {v: sorted(schema.query(f"SELECT * FROM {v}").result_rows, key=str) for v in KPI_VIEWS}

    before = snapshot()
    rows_before = schema.query("SELECT count() FROM agg_campaign_daily").result_rows
    w.facts("fact_impressions", T_IMP, batch, token)  # the retry
    assert snapshot() == before
    assert schema.query("SELECT count() FROM agg_campaign_daily").result_rows == rows_before
    report = verify.compare(pg, schema)
    assert report.ok, report
    assert verify.totals(pg, schema)["impressions"].clickhouse == 6
