"""The migrations' cluster forms (consumer.sink.cluster_ddl): every statement parses in
ClickHouse's own parser (formatQuery, embedded chdb), the Replicated/ON CLUSTER form included —
which cannot run here (no Keeper) —, the rules hold for every table of every file (a later file
too), and the shard-local tables and views work on a real (embedded) ClickHouse."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from consumer.sink.clickhouse import connect
from consumer.sink.cluster_ddl import ClusterDDLError, ClusterLayout, cluster_statements, sharded_tables
from consumer.sink.migrate import discover

PLAIN = ClusterLayout("cdc")
REPLICATED = ClusterLayout("cdc", replicated=True)
MIGRATIONS = discover()
STATEMENTS = [s for m in MIGRATIONS for s in m.statements]
SHARDED = sharded_tables(STATEMENTS)


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory):
    return connect(None, embedded_path=tmp_path_factory.mktemp("chdb-cluster-ddl"))


def forms(layout: ClusterLayout) -> list[str]:
    return [node for s in STATEMENTS for node in cluster_statements(s, SHARDED, layout)]


def test_every_merge_tree_table_is_sharded() -> None:
    assert {
        "dim_advertiser",
        "dim_campaign",
        "fact_impressions",
        "fact_clicks",
        "agg_campaign_daily",
        "_cdc_audit_checkpoints",
    } == SHARDED


@pytest.mark.parametrize("layout", [PLAIN, REPLICATED], ids=["node by node", "replicated"])
def test_every_cluster_statement_parses(clickhouse, layout: ClusterLayout) -> None:
    for statement in forms(layout):
        formatted = clickhouse.query("SELECT formatQuery({q:String})", parameters={"q": statement}).result_rows
        assert formatted and formatted[0][0].startswith(("CREATE", "ALTER")), statement


def test_locals_and_distributed_tables_under_the_readers_names() -> None:
    statements = forms(PLAIN)
    for table in SHARDED:
        assert any(s.startswith(f"CREATE TABLE IF NOT EXISTS `{table}_local`\n") for s in statements), table
        (distributed,) = [s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS `{table}` ")]
        key = ", _partition" if table != "agg_campaign_daily" else ""
        assert distributed.endswith(f"Distributed('cdc', currentDatabase(), '{table}_local'{key})"), distributed
    # The views feeding the aggregate read and write the locals only; the KPI views read the
    # Distributed tables, unchanged but for the quoted name.
    views = [s for s in statements if s.startswith("CREATE MATERIALIZED VIEW")]
    assert len(views) == 2
    for view in views:
        named = set(re.findall(r"`(\w+)`", view)) - {v for v in re.findall(r"VIEW IF NOT EXISTS `(\w+)`", view)}
        assert named and all(name.endswith("_local") for name in named), view
    kpi = [s for s in statements if "VIEW `kpi_" in s]
    assert len(kpi) == 5 and not any("_local" in s for s in kpi)


def test_replicated_locals_use_keeper_macros_and_every_statement_is_on_cluster() -> None:
    statements = forms(REPLICATED)
    assert all("ON CLUSTER `cdc`" in s for s in statements)
    engines = re.findall(r"ENGINE = (\w+)\(('[^']*', '[^']*')", "\n".join(statements))
    assert {engine for engine, _ in engines} == {
        "ReplicatedReplacingMergeTree",
        "ReplicatedMergeTree",
        "ReplicatedSummingMergeTree",
    }
    for _, arguments in engines:
        assert re.fullmatch(r"'/clickhouse/tables/\{shard\}/\{database\}/\w+_local', '\{replica\}'", arguments)
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/dim_campaign_local', '{replica}', _version, _is_deleted)" in "\n".join(statements)  # fmt: skip


def test_a_later_migration_file_follows_the_same_rules() -> None:
    later = [
        "-- offsets accounted for without rows\nCREATE TABLE IF NOT EXISTS offset_accounting\n(\n"
        "    _topic String,\n    _partition UInt32,\n    _offset UInt64\n)\nENGINE = MergeTree\nORDER BY (_topic, _partition, _offset)",
        "ALTER TABLE fact_clicks ADD COLUMN IF NOT EXISTS channel String DEFAULT ''",
        "ALTER TABLE fact_clicks MATERIALIZE PROJECTION applied_watermarks",
    ]
    sharded = sharded_tables([*STATEMENTS, *later])
    assert "offset_accounting" in sharded
    created = cluster_statements(later[0], sharded, PLAIN)
    assert created[0].startswith("CREATE TABLE IF NOT EXISTS `offset_accounting_local`")
    assert created[1].endswith("Distributed('cdc', currentDatabase(), 'offset_accounting_local', _partition)")
    replicated = cluster_statements(later[0], sharded, REPLICATED)[0]
    assert (
        "ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/offset_accounting_local', '{replica}')"
        in replicated
    )
    # A column change on the local and the Distributed table; anything else on the local only.
    assert [s.split(" ADD")[0] for s in cluster_statements(later[1], sharded, PLAIN)] == [
        "ALTER TABLE `fact_clicks_local`",
        "ALTER TABLE `fact_clicks`",
    ]
    assert cluster_statements(later[2], sharded, PLAIN) == [
        "ALTER TABLE `fact_clicks_local` MATERIALIZE PROJECTION applied_watermarks"
    ]


def test_a_statement_it_cannot_spread_is_refused() -> None:
    with pytest.raises(ClusterDDLError, match="cannot spread"):
        cluster_statements("INSERT INTO fact_clicks SELECT * FROM fact_clicks", SHARDED, PLAIN)


def test_the_locals_and_their_views_work_on_one_node(clickhouse) -> None:
    """A shard's part of the cluster on a real (embedded) ClickHouse: the locals and the views
    that feed the aggregate from them (the Distributed tables need a cluster: the stack tests)."""
    for statement in forms(PLAIN):
        if "Distributed(" not in statement and "VIEW `kpi_" not in statement:
            clickhouse.command(statement)
    clickhouse.command(
        "INSERT INTO fact_impressions_local (id, campaign_id, created_at, cost, _sign, _topic, _partition, _offset)"
        " VALUES (1, 7, '2026-01-02 03:04:05', 0.5, 1, 't', 1, 10), (2, 7, '2026-01-02 04:00:00', 0.25, 1, 't', 1, 11)"
    )
    rows = clickhouse.query(
        "SELECT campaign_id, sum(impressions), sum(spend) FROM agg_campaign_daily_local GROUP BY campaign_id"
    ).result_rows
    assert rows == [(7, 2, Decimal("0.75"))]
