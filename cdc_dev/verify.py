"""Ground truth: the ClickHouse star schema compared with the Postgres source tables.

:func:`compare` computes every KPI of the ClickHouse views (``clickhouse/004_kpi_views.sql``) a
second time with SQL in Postgres, from the source tables (live rows only), and compares the
dimensions (``dim_* FINAL`` without deleted rows) with the Postgres rows, column by column. Counts
and decimals must be equal exactly, ratios within 1e-9 relative, NULLs must match.

It also checks ClickHouse against itself: the KPI aggregate ``agg_campaign_daily`` must equal the
signed fact rows re-aggregated (a failed materialized-view insert leaves the facts, and therefore
the consumer's watermark, ahead of the aggregate; this section tells that apart from lost facts).

Both sides are read through unqualified table names: Postgres resolves them with the connection's
``search_path``, ClickHouse in the client's current database. Usage::

    report = compare("postgresql://…/adtech", clickhouse_connect.get_client(...))
    assert report.ok, report

:func:`totals` gives the live row counts per table on both sides (for "lost" / "double counted").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

REL_TOL = 1e-9
SAMPLE = 5
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Dimension table in ClickHouse -> source table in Postgres.
DIMENSIONS = {"dim_advertiser": "advertiser", "dim_campaign": "campaign"}
# Fact table in ClickHouse -> source table in Postgres.
FACTS = {"fact_impressions": "impressions", "fact_clicks": "clicks"}


# --------------------------------------------------------------------------------------------------
# Report


@dataclass
class Mismatch:
    key: tuple[Any, ...]
    column: str
    expected: Any
    actual: Any


@dataclass
class Section:
    """The comparison of one KPI view or dimension (expected = Postgres, actual = ClickHouse)."""

    name: str
    key: tuple[str, ...]
    expected_source: str = "postgres"
    actual_source: str = "clickhouse"
    expected_rows: int = 0
    actual_rows: int = 0
    compared: int = 0
    missing_count: int = 0
    extra_count: int = 0
    mismatched_rows: int = 0
    missing: list[tuple[Any, ...]] = field(default_factory=list)
    extra: list[tuple[Any, ...]] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_count or self.extra_count or self.mismatched_rows or self.problems)

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        head = (
            f"{self.name}: {status} — {self.expected_source} {self.expected_rows} rows, "
            f"{self.actual_source} {self.actual_rows} rows, {self.compared} compared"
        )
        if not self.ok:
            head += (
                f", {self.missing_count} missing in {self.actual_source}, "
                f"{self.extra_count} extra in {self.actual_source}, {self.mismatched_rows} rows differ"
            )
        lines = [head]
        lines += [f"    problem: {p}" for p in self.problems]
        lines += [f"    note: {n}" for n in self.notes]
        keys = ", ".join(self.key)
        lines += [f"    missing in {self.actual_source} ({keys}) = {_show(k)}" for k in self.missing]
        lines += [f"    extra in {self.actual_source} ({keys}) = {_show(k)}" for k in self.extra]
        lines += [
            f"    ({keys}) = {_show(m.key)}: {m.column}: {self.expected_source} {_show(m.expected)} "
            f"!= {self.actual_source} {_show(m.actual)}"
            for m in self.mismatches
        ]
        return "\n".join(lines)


@dataclass
class Report:
    sections: list[Section] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sections)

    @property
    def failed(self) -> list[str]:
        return [s.name for s in self.sections if not s.ok]

    def section(self, name: str) -> Section:
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(name)

    def __str__(self) -> str:
        head = "ClickHouse matches Postgres" if self.ok else f"MISMATCH in {', '.join(self.failed)}"
        return "\n".join([head, *(str(s) for s in self.sections)])


def _show(value: Any, limit: int = 80) -> str:
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…({len(text)} chars)"


# --------------------------------------------------------------------------------------------------
# Value comparison


def values_equal(expected: Any, actual: Any, rel_tol: float = REL_TOL) -> bool:
    """Exact for counts, decimals, text, dates; relative tolerance for floats; NULL only equals NULL."""
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, float) or isinstance(actual, float):
        a, b = float(expected), float(actual)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
    if isinstance(expected, Decimal | int) and isinstance(actual, Decimal | int):
        return Decimal(expected) == Decimal(actual)
    return bool(expected == actual)


def _compare_rows(
    section: Section,
    columns: Sequence[str],
    expected: Sequence[Sequence[Any]],
    actual: Sequence[Sequence[Any]],
    sample: int,
) -> Section:
    """Rows are tuples in `columns` order whose first len(section.key) values are the key."""
    nkey = len(section.key)
    section.expected_rows, section.actual_rows = len(expected), len(actual)
    exp = _by_key(section, expected, nkey, section.expected_source)
    act = _by_key(section, actual, nkey, section.actual_source)
    for key in sorted(exp.keys() - act.keys(), key=_sort_key):
        section.missing_count += 1
        if len(section.missing) < sample:
            section.missing.append(key)
    for key in sorted(act.keys() - exp.keys(), key=_sort_key):
        section.extra_count += 1
        if len(section.extra) < sample:
            section.extra.append(key)
    for key in sorted(exp.keys() & act.keys(), key=_sort_key):
        section.compared += 1
        differs = False
        for i in range(nkey, len(columns)):
            if not values_equal(exp[key][i], act[key][i]):
                differs = True
                if len(section.mismatches) < sample:
                    section.mismatches.append(Mismatch(key, columns[i], exp[key][i], act[key][i]))
        section.mismatched_rows += differs
    return section


def _by_key(section: Section, rows: Sequence[Sequence[Any]], nkey: int, source: str) -> dict[tuple, tuple]:
    out: dict[tuple, tuple] = {}
    duplicates = 0
    for row in rows:
        key = tuple(row[:nkey])
        duplicates += key in out
        out[key] = tuple(row)
    if duplicates:
        section.problems.append(f"{duplicates} duplicate keys in {source}")
    return out


def _sort_key(key: tuple) -> tuple:
    return tuple((v is None, str(type(v)), v if v is not None else 0) for v in key)


# --------------------------------------------------------------------------------------------------
# The KPIs, twice

# Events of live facts in Postgres, one row per impression or click, with the view's event_date.
_PG_EVENTS = """
    events AS (
        SELECT (created_at AT TIME ZONE 'UTC')::date AS event_date, campaign_id,
               1 AS imp, 0 AS clk, cost
        FROM impressions
        UNION ALL
        SELECT (created_at AT TIME ZONE 'UTC')::date, campaign_id, 0, 1, cost
        FROM clicks
    ),
    per_campaign AS (
        SELECT campaign_id, sum(imp)::bigint AS imp, sum(clk)::bigint AS clk, sum(cost) AS amt
        FROM events
        GROUP BY campaign_id
    )
"""


@dataclass(frozen=True)
class Kpi:
    view: str
    key: tuple[str, ...]
    columns: tuple[str, ...]
    postgres_sql: str


KPIS: tuple[Kpi, ...] = (
    Kpi(
        "kpi_campaign_ctr",
        ("campaign_id",),
        ("campaign_id", "campaign_name", "advertiser_name", "impressions", "clicks", "ctr"),
        f"""
        WITH {_PG_EVENTS}
        SELECT c.id, c.name, a.name, COALESCE(p.imp, 0), COALESCE(p.clk, 0),
               CASE WHEN COALESCE(p.imp, 0) = 0 THEN 0::float8 ELSE p.clk::float8 / p.imp END
        FROM campaign c
        LEFT JOIN advertiser a ON a.id = c.advertiser_id
        LEFT JOIN per_campaign p ON p.campaign_id = c.id
        """,
    ),
    Kpi(
        "kpi_daily_performance",
        ("event_date",),
        ("event_date", "impressions", "clicks", "ctr", "spend"),
        f"""
        WITH {_PG_EVENTS}
        SELECT event_date, sum(imp)::bigint, sum(clk)::bigint,
               CASE WHEN sum(imp) = 0 THEN 0::float8 ELSE sum(clk)::float8 / sum(imp) END,
               sum(cost)
        FROM events
        GROUP BY event_date
        """,
    ),
    Kpi(
        "kpi_campaign_daily",
        ("campaign_id", "event_date"),
        ("campaign_id", "event_date", "impressions", "clicks", "ctr", "spend"),
        f"""
        WITH {_PG_EVENTS}
        SELECT campaign_id, event_date, sum(imp)::bigint, sum(clk)::bigint,
               CASE WHEN sum(imp) = 0 THEN 0::float8 ELSE sum(clk)::float8 / sum(imp) END,
               sum(cost)
        FROM events
        GROUP BY campaign_id, event_date
        """,
    ),
    Kpi(
        "kpi_cost_efficiency",
        ("campaign_id",),
        ("campaign_id", "spend", "budget", "budget_used", "cpm", "cpc"),
        f"""
        WITH {_PG_EVENTS}
        SELECT c.id, COALESCE(p.amt, 0), c.budget,
               CASE WHEN c.budget = 0 THEN NULL ELSE (COALESCE(p.amt, 0) / c.budget)::float8 END,
               CASE WHEN COALESCE(p.imp, 0) = 0 THEN NULL ELSE (1000 * p.amt / p.imp)::float8 END,
               CASE WHEN COALESCE(p.clk, 0) = 0 THEN NULL ELSE (p.amt / p.clk)::float8 END
        FROM campaign c
        LEFT JOIN per_campaign p ON p.campaign_id = c.id
        """,
    ),
    Kpi(
        "kpi_advertiser_overview",
        ("advertiser_id",),
        ("advertiser_id", "advertiser_name", "campaigns", "impressions", "clicks", "ctr", "spend"),
        f"""
        WITH {_PG_EVENTS},
        per_advertiser AS (
            SELECT c.advertiser_id, count(*)::bigint AS n,
                   sum(COALESCE(p.imp, 0))::bigint AS imp, sum(COALESCE(p.clk, 0))::bigint AS clk,
                   sum(COALESCE(p.amt, 0)) AS amt
            FROM campaign c
            LEFT JOIN per_campaign p ON p.campaign_id = c.id
            GROUP BY c.advertiser_id
        )
        SELECT a.id, a.name, COALESCE(x.n, 0), COALESCE(x.imp, 0), COALESCE(x.clk, 0),
               CASE WHEN COALESCE(x.imp, 0) = 0 THEN 0::float8 ELSE x.clk::float8 / x.imp END,
               COALESCE(x.amt, 0)
        FROM advertiser a
        LEFT JOIN per_advertiser x ON x.advertiser_id = a.id
        """,
    ),
)

# ClickHouse against itself: the aggregate must equal the signed facts re-aggregated.
_AGG_COLUMNS = ("campaign_id", "event_date", "impressions", "clicks", "spend")
_AGG_FROM_AGGREGATE = """
    SELECT campaign_id, event_date, sum(impressions) AS i, sum(clicks) AS c, sum(spend) AS s
    FROM agg_campaign_daily
    GROUP BY campaign_id, event_date
    HAVING i != 0 OR c != 0 OR s != 0
"""
_AGG_FROM_FACTS = """
    SELECT campaign_id, event_date, sum(i) AS i, sum(c) AS c, sum(s) AS s
    FROM
    (
        SELECT campaign_id, toDate(created_at, 'UTC') AS event_date, toInt64(_sign) AS i,
               toInt64(0) AS c, toDecimal128(_sign * cost, 6) AS s
        FROM fact_impressions
        UNION ALL
        SELECT campaign_id, toDate(created_at, 'UTC'), toInt64(0), toInt64(_sign),
               toDecimal128(_sign * cost, 6)
        FROM fact_clicks
    )
    GROUP BY campaign_id, event_date
    HAVING i != 0 OR c != 0 OR s != 0
"""


# --------------------------------------------------------------------------------------------------
# Entry points


@contextmanager
def _pg(pg_conn_or_dsn: Any) -> Iterator[psycopg.Connection]:
    """One consistent snapshot for all Postgres queries."""
    if isinstance(pg_conn_or_dsn, psycopg.Connection):
        with pg_conn_or_dsn.transaction():
            yield pg_conn_or_dsn
        return
    with psycopg.connect(pg_conn_or_dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            yield conn


def _pg_rows(conn: psycopg.Connection, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    # A savepoint per query: a failing query fails its section, not the ones after it.
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def _ch_rows(ch: Any, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
    return [tuple(r) for r in ch.query(sql, parameters=parameters).result_rows]


def _guarded(section: Section, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as ex:  # a failing query is a failed section, not a crash of the whole report
        section.problems.append(f"{type(ex).__name__}: {str(ex).strip().splitlines()[0][:300]}")


def compare(pg_conn_or_dsn: Any, ch_client: Any, *, check_aggregate: bool = True, sample: int = SAMPLE) -> Report:
    """Compare every KPI view and dimension of ClickHouse with Postgres.

    ``pg_conn_or_dsn``: a psycopg connection (used inside ``conn.transaction()``) or a DSN (opened
    read-only, REPEATABLE READ, closed again). ``ch_client``: a clickhouse-connect client whose
    current database holds the star schema. Take the comparison when the pipeline is quiet: both
    sides are read at slightly different moments.
    """
    report = Report()
    with _pg(pg_conn_or_dsn) as conn:
        for kpi in KPIS:
            section = Section(kpi.view, kpi.key)
            report.sections.append(section)

            def run(kpi: Kpi = kpi, section: Section = section) -> None:
                expected = _pg_rows(conn, kpi.postgres_sql)
                actual = _ch_rows(ch_client, f"SELECT {', '.join(kpi.columns)} FROM {kpi.view}")
                _compare_rows(section, kpi.columns, expected, actual, sample)

            _guarded(section, run)
        for ch_table, pg_table in DIMENSIONS.items():
            section = Section(ch_table, ("id",))
            report.sections.append(section)
            _guarded(
                section,
                lambda ch_table=ch_table, pg_table=pg_table, section=section: _compare_dimension(
                    conn, ch_client, ch_table, pg_table, section, sample
                ),
            )
    if check_aggregate:
        section = Section("agg_campaign_daily vs facts", ("campaign_id", "event_date"), "facts", "aggregate")
        report.sections.append(section)

        def run_agg(section: Section = section) -> None:
            expected = _ch_rows(ch_client, _AGG_FROM_FACTS)
            actual = _ch_rows(ch_client, _AGG_FROM_AGGREGATE)
            _compare_rows(section, _AGG_COLUMNS, expected, actual, sample)

        _guarded(section, run_agg)
    return report


def _compare_dimension(
    conn: psycopg.Connection, ch: Any, ch_table: str, pg_table: str, section: Section, sample: int
) -> None:
    pg_columns = _pg_rows(
        conn,
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (pg_table,),
    )
    if not pg_columns:
        raise LookupError(f"Postgres table {pg_table} not found on the search_path")
    ch_columns = dict(
        _ch_rows(
            ch,
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = {t:String} "
            "AND NOT startsWith(name, '_')",
            {"t": ch_table},
        )
    )
    if not ch_columns:
        raise LookupError(f"ClickHouse table {ch_table} not found in the current database")
    names = [name for name, _ in pg_columns if name in ch_columns]
    if "id" not in names:
        raise LookupError(f"{pg_table}/{ch_table} have no common id column")
    names.remove("id")
    names.insert(0, "id")
    missing = [name for name, _ in pg_columns if name not in ch_columns]
    if missing:
        section.problems.append(f"Postgres columns missing in ClickHouse: {', '.join(missing)}")
    pg_types = dict(pg_columns)
    extra = [name for name in ch_columns if name not in pg_types]
    if extra:
        section.notes.append(f"ClickHouse-only columns not compared: {', '.join(extra)}")

    # Timestamps are compared as integer microseconds since the epoch, independent of time zones.
    pg_exprs, ch_exprs, timestamps = [], [], []
    for i, name in enumerate(names):
        if pg_types[name].startswith("timestamp") and ch_columns[name].startswith("DateTime64"):
            pg_exprs.append(f'(extract(epoch FROM "{name}") * 1000000)::bigint')
            ch_exprs.append(f"toUnixTimestamp64Micro(`{name}`)")
            timestamps.append(i)
        else:
            pg_exprs.append(f'"{name}"')
            ch_exprs.append(f"`{name}`")
    expected = _pg_rows(conn, f"SELECT {', '.join(pg_exprs)} FROM {pg_table}")
    actual = _ch_rows(ch, f"SELECT {', '.join(ch_exprs)} FROM {ch_table} FINAL WHERE _is_deleted = 0")
    if timestamps:
        expected = [_micros_to_datetime(row, timestamps) for row in expected]
        actual = [_micros_to_datetime(row, timestamps) for row in actual]
    _compare_rows(section, names, expected, actual, sample)


def _micros_to_datetime(row: Sequence[Any], positions: Sequence[int]) -> tuple:
    out = list(row)
    for i in positions:
        if out[i] is not None:
            out[i] = _EPOCH + timedelta(microseconds=int(out[i]))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Totals


@dataclass
class TableTotals:
    """Live rows of one source table, on both sides.

    ``clickhouse``: sum(_sign) for facts, rows of ``FINAL`` without deletes for dimensions.
    ``clickhouse_rows``: rows physically stored (signed rows / versions, before merges).
    ``clickhouse_aggregate``: for facts, the count according to ``agg_campaign_daily``.
    ``lost`` / ``double_counted`` are net figures: a lost and a duplicated row cancel out here
    (``compare`` finds them).
    """

    table: str
    postgres: int
    clickhouse: int
    clickhouse_rows: int
    clickhouse_aggregate: int | None = None

    @property
    def lost(self) -> int:
        return max(self.postgres - self.clickhouse, 0)

    @property
    def double_counted(self) -> int:
        return max(self.clickhouse - self.postgres, 0)

    def __str__(self) -> str:
        agg = "" if self.clickhouse_aggregate is None else f", aggregate {self.clickhouse_aggregate}"
        return (
            f"{self.table}: postgres {self.postgres}, clickhouse {self.clickhouse}{agg} "
            f"(lost {self.lost}, double counted {self.double_counted}; {self.clickhouse_rows} rows stored)"
        )


def totals(pg_conn_or_dsn: Any, ch_client: Any) -> dict[str, TableTotals]:
    """Live row counts per source table ('advertiser', 'campaign', 'impressions', 'clicks')."""
    out: dict[str, TableTotals] = {}
    with _pg(pg_conn_or_dsn) as conn:
        pg_counts = {
            table: int(_pg_rows(conn, f"SELECT count(*) FROM {table}")[0][0])
            for table in (*DIMENSIONS.values(), *FACTS.values())
        }
    agg = _ch_rows(ch_client, "SELECT sum(impressions), sum(clicks) FROM agg_campaign_daily")[0]
    agg_by_table = {"impressions": int(agg[0]), "clicks": int(agg[1])}
    for ch_table, pg_table in FACTS.items():
        live, rows = _ch_rows(ch_client, f"SELECT sum(toInt64(_sign)), count() FROM {ch_table}")[0]
        out[pg_table] = TableTotals(pg_table, pg_counts[pg_table], int(live), int(rows), agg_by_table[pg_table])
    for ch_table, pg_table in DIMENSIONS.items():
        live = _ch_rows(ch_client, f"SELECT count() FROM {ch_table} FINAL WHERE _is_deleted = 0")[0][0]
        rows = _ch_rows(ch_client, f"SELECT count() FROM {ch_table}")[0][0]
        out[pg_table] = TableTotals(pg_table, pg_counts[pg_table], int(live), int(rows))
    return out
