"""Changes in Postgres while traffic flows: a column added to `campaign` (and dropped again), a
large TOASTed update, primary-key changes, a campaign deleted with its facts (cascade)."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from tests.consumer_helpers import new_target, start_consumer
from tests.faults.helpers import Probe, Result, Traffic, settle_and_check, warm_up

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.faults]

CREATIVE_KB = 640


def _own_campaign(conn: psycopg.Connection, impressions: int, clicks: int) -> tuple[int, list[int], int]:
    """A campaign of our own (the traffic generator never deletes it under us) with facts;
    returns its id, its impression ids and the number of rows written."""
    (advertiser,) = conn.execute("INSERT INTO advertiser (name) VALUES ('fault-suite') RETURNING id").fetchone()
    (campaign,) = conn.execute(
        "INSERT INTO campaign (advertiser_id, name, bid_amount, budget, creative) "
        "VALUES (%s, 'fault-suite', 1.2500, 5000.00, repeat('<p>fault</p>', 300)) RETURNING id",
        (advertiser,),
    ).fetchone()
    ids = [
        row[0]
        for row in conn.execute(
            "INSERT INTO impressions (campaign_id, created_at, cost) "
            "SELECT %s, now() - i * interval '7 minutes', 0.000100 * i FROM generate_series(1, %s) AS i RETURNING id",
            (campaign, impressions),
        )
    ]
    conn.execute(
        "INSERT INTO clicks (impression_id, campaign_id, created_at, cost) "
        "SELECT id, campaign_id, created_at + interval '3 seconds', 0.250000 FROM impressions "
        "WHERE id = ANY(%s) ORDER BY id LIMIT %s",
        (ids, clicks),
    )
    return campaign, ids, 2 + impressions + clicks


def test_column_added_toast_update_key_change_and_cascade_during_traffic(stack, tmp_path) -> None:
    # A fresh name per run: DDL is not captured, so the topics keep a dropped column's values.
    column = f"fault_priority_{uuid.uuid4().hex[:6]}"
    target = new_target(stack, tmp_path)
    consumer = start_consumer(target, tmp_path)
    changes = 0
    try:
        try:
            warm_up(stack, target, consumer)
            with (
                Traffic(stack.postgres_dsn, seed=5901) as traffic,
                psycopg.connect(stack.postgres_dsn, autocommit=True) as conn,
            ):
                time.sleep(3)
                kept, kept_impressions, written = _own_campaign(conn, impressions=400, clicks=40)
                doomed, _, more = _own_campaign(conn, impressions=300, clicks=30)
                changes += written + more
                time.sleep(1)

                conn.execute(f"ALTER TABLE campaign ADD COLUMN {column} integer")
                changes += conn.execute(
                    f"UPDATE campaign SET {column} = id %% 7 + 1, updated_at = now() "
                    "WHERE id = %s OR id IN (SELECT id FROM campaign ORDER BY id DESC LIMIT 10)",
                    (kept,),
                ).rowcount
                time.sleep(1)

                # A large, poorly compressible creative: TOASTed out of line; then an update that leaves
                # it alone (Debezium sends the unchanged-TOAST placeholder, resolved to this value).
                changes += conn.execute(
                    "UPDATE campaign SET creative = (SELECT string_agg(md5(i::text), '') "
                    "FROM generate_series(1, %s) AS i), updated_at = now() WHERE id = %s",
                    (CREATIVE_KB * 1000 // 32, kept),
                ).rowcount
                changes += conn.execute(
                    "UPDATE campaign SET budget = budget + 1, updated_at = now() WHERE id = %s", (kept,)
                ).rowcount
                time.sleep(1)

                # Primary-key changes: Debezium emits a delete of the old key and a create of the new one.
                no_clicks = conn.execute(
                    "SELECT id FROM impressions i WHERE id = ANY(%s) AND NOT EXISTS "
                    "(SELECT 1 FROM clicks c WHERE c.impression_id = i.id) ORDER BY id LIMIT 25",
                    (kept_impressions,),
                ).fetchall()
                moved = [row[0] for row in no_clicks]
                changes += 2 * conn.execute("UPDATE impressions SET id = -id WHERE id = ANY(%s)", (moved,)).rowcount

                # A campaign deleted with its facts: ON DELETE CASCADE, one delete event per row.
                changes += conn.execute(
                    "SELECT (SELECT count(*) FROM impressions WHERE campaign_id = %(c)s) "
                    "+ (SELECT count(*) FROM clicks WHERE campaign_id = %(c)s) + 1",
                    {"c": doomed},
                ).fetchone()[0]
                conn.execute("DELETE FROM campaign WHERE id = %s", (doomed,))
                done = time.monotonic()
                time.sleep(2)
                recovery = Probe(stack.postgres_dsn).recovery(target.clickhouse(), done, process=consumer)

            result = Result(
                "Postgres: column added, TOAST, key change, cascade",
                traffic.events + changes,
                recovery_s=recovery,
                note=f"+{column} (dropped after), {CREATIVE_KB} KB creative, {len(moved)} ids changed, "
                "campaign with 330 facts deleted",
            )
            settle_and_check(stack, target, result, process=consumer)  # compares the new column too

            ch = target.clickhouse()
            columns = dict(
                ch.query(
                    "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'dim_campaign'"
                ).result_rows
            )
            assert columns.get(column) == "Nullable(Int64)", "the new column reached ClickHouse without a restart"
            (size,) = ch.query(
                "SELECT length(creative) FROM dim_campaign FINAL WHERE id = {id:Int64}", parameters={"id": kept}
            ).result_rows[0]
            assert size == CREATIVE_KB * 1000
            live = dict(
                ch.query(
                    "SELECT id > 0, sum(_sign) FROM fact_impressions WHERE abs(id) IN {ids:Array(Int64)} GROUP BY id > 0",
                    parameters={"ids": moved},
                ).result_rows
            )
            assert live == {True: 0, False: len(moved)}, "old keys retracted, new keys live"
            (left,) = ch.query(
                "SELECT sum(_sign) FROM fact_impressions WHERE campaign_id = {c:Int64}", parameters={"c": doomed}
            ).result_rows[0]
            assert left == 0, "the cascade retracted every fact of the deleted campaign"
        finally:
            with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE campaign DROP COLUMN IF EXISTS {column}")
        # After the drop the campaign's events no longer carry the column: still equal to Postgres.
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            conn.execute("UPDATE campaign SET budget = budget + 1, updated_at = now() WHERE id = %s", (kept,))
        settle_and_check(stack, target, result, process=consumer)
    finally:
        consumer.stop()
