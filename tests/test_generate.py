"""The traffic generator against a real Postgres: what it writes, and that a seed reproduces it.

Needs CDC_POSTGRES_DSN pointing at a server where the user may create databases; the tests
work in scratch databases of their own (created from postgres/schema.sql, dropped afterwards)
so they never touch the data behind the DSN.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from random import Random

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import cdc_dev.generate as generator
from cdc_dev.generate import GeneratorStats, generate, render_progress

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SCHEMA = Path(__file__).resolve().parent.parent / "postgres" / "schema.sql"
TABLES = ("advertiser", "campaign", "impressions", "clicks")
RATE = 20_000.0  # the rate the generator must sustain on a 2-core machine
DURATION = 5.0  # 100,000 events: enough for the rare kinds (an advertiser delete) to occur
SEED = 20240601


def scratch_database() -> Iterator[str]:
    """A fresh database with the source schema; yields its DSN and drops it afterwards."""
    DSN = os.environ["CDC_POSTGRES_DSN"]  # set by the session's stack fixture
    name = f"gen_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(DSN, autocommit=True) as admin:
        try:
            admin.execute(f'CREATE DATABASE "{name}"')
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("the CDC_POSTGRES_DSN user may not create the scratch databases these tests use")
    dsn = make_conninfo(DSN, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA.read_text())
        yield dsn
    finally:
        _drop_database(DSN, name)


def _drop_database(dsn: str, name: str, patience_s: float = 60.0) -> None:
    """DROP … WITH (FORCE) ends the test's own sessions, but a non-superuser may not end an
    autovacuum worker that happens to be in the new database (InsufficientPrivilege, seen in CI):
    it finishes within seconds, so the drop is tried again until then."""
    deadline = time.monotonic() + patience_s
    with psycopg.connect(dsn, autocommit=True) as admin:
        while True:
            try:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except psycopg.errors.InsufficientPrivilege:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture(scope="module")
def first_db() -> Iterator[str]:
    yield from scratch_database()


@pytest.fixture(scope="module")
def second_db() -> Iterator[str]:
    yield from scratch_database()


@pytest.fixture
def own_db() -> Iterator[str]:
    yield from scratch_database()


@pytest.fixture(scope="module")
def first_run(first_db: str) -> GeneratorStats:
    reports: list[GeneratorStats] = []
    stats = generate(first_db, rate=RATE, duration=DURATION, seed=SEED, progress=reports.append)
    assert reports, "progress was never reported"
    print(render_progress(stats))
    return stats


def scalar(dsn: str, query: str) -> object:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchone()[0]


def table_digest(dsn: str, table: str) -> tuple[int, str]:
    """Row count and an md5 of every row's text, in id order: equal digests, equal tables."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        return conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t.id), '')) FROM {table} t"
        ).fetchone()


def test_writes_all_four_tables_and_counts_exactly(first_db: str, first_run: GeneratorStats) -> None:
    counted = {
        "advertiser": first_run.advertisers,
        "campaign": first_run.campaigns,
        "impressions": first_run.impressions,
        "clicks": first_run.clicks,
    }
    for table, ops in counted.items():
        rows = scalar(first_db, f"SELECT count(*) FROM {table}")
        assert rows > 0, f"{table} is empty"
        # Alone on a fresh database, the stats must account for every row, cascades included.
        assert rows == ops.inserts - ops.deletes, f"{table}: {rows} rows but stats say {ops}"
    assert RATE * DURATION <= first_run.events <= RATE * DURATION * 1.05


def test_updates_campaigns_with_and_without_the_toasted_creative(first_db: str, first_run: GeneratorStats) -> None:
    assert first_run.campaigns.updates > 0
    assert scalar(first_db, "SELECT count(*) FROM campaign WHERE updated_at > created_at") > 0
    # Creatives are large and incompressible: stored size (pg_column_size) stays above 8 kB.
    assert scalar(first_db, "SELECT min(length(creative)) FROM campaign") > 8000
    assert scalar(first_db, "SELECT min(pg_column_size(creative)) FROM campaign") > 8000
    # Most campaign updates leave the creative alone (Debezium's unchanged-TOAST case).
    assert 0 < first_run.creative_rewrites < first_run.campaigns.updates / 2
    rewritten = scalar(first_db, "SELECT count(*) FROM campaign WHERE creative NOT LIKE '%data-version=\"1\"%'")
    assert rewritten > 0


def test_deletes_dimensions_and_facts(first_db: str, first_run: GeneratorStats) -> None:
    for ops in (first_run.advertisers, first_run.campaigns, first_run.impressions, first_run.clicks):
        assert ops.deletes > 0, first_run
    assert first_run.cascaded_deletes > 0
    # On a fresh database ids are handed out without gaps, so missing ids are deleted rows.
    for table in TABLES:
        assert scalar(first_db, f"SELECT max(id) - count(*) FROM {table}") > 0, table


def test_clicks_follow_impressions_of_the_same_campaign(first_db: str) -> None:
    mismatched = scalar(
        first_db,
        "SELECT count(*) FROM clicks c JOIN impressions i ON i.id = c.impression_id"
        " WHERE c.campaign_id <> i.campaign_id OR c.created_at < i.created_at"
        " OR c.created_at > i.created_at + interval '10 minutes'",
    )
    assert mismatched == 0
    ctr = scalar(first_db, "SELECT (SELECT count(*) FROM clicks)::float / (SELECT count(*) FROM impressions)")
    assert 0.003 < ctr < 0.06


def test_facts_look_like_ad_traffic(first_db: str, first_run: GeneratorStats) -> None:
    assert first_run.impressions.updates > 0 and first_run.clicks.updates > 0  # cost corrections
    # Costs use all six decimals, not just round numbers.
    assert scalar(first_db, "SELECT count(*) FROM impressions WHERE (cost * 1000000) % 1000 <> 0") > 0
    # Late impressions spread the facts over several UTC days, the rest is near the start time.
    days = scalar(first_db, "SELECT count(DISTINCT (created_at AT TIME ZONE 'UTC')::date) FROM impressions")
    assert days >= 3
    with psycopg.connect(first_db) as conn:
        recent = conn.execute(
            "SELECT count(*) FILTER (WHERE created_at >= %s - interval '1 minute')::float / count(*) FROM impressions",
            [first_run.started_at],
        ).fetchone()[0]
    assert recent > 0.9


def test_same_seed_same_data(first_db: str, second_db: str, first_run: GeneratorStats) -> None:
    # The first run anchored its simulated clock at its own start; pin the same anchor.
    again = generate(second_db, rate=RATE, duration=DURATION, seed=SEED, start=first_run.started_at)
    assert again.events == first_run.events
    for table in TABLES:
        assert table_digest(second_db, table) == table_digest(first_db, table), table


def test_continues_on_existing_data_without_id_collisions(own_db: str) -> None:
    generate(own_db, rate=5000, duration=1.0, seed=SEED)
    before = {table: scalar(own_db, f"SELECT max(id) FROM {table}") for table in TABLES}
    # Another writer inserts an explicit id past the sequence: the generator must step over it.
    stray_id = before["impressions"] + 10
    with psycopg.connect(own_db) as conn:
        conn.execute(
            "INSERT INTO impressions (id, campaign_id, cost)"
            " SELECT %s, min(id), 0.001 FROM campaign WHERE status = 'active'",
            [stray_id],
        )
    stats = generate(own_db, rate=3000, duration=2.0, seed=SEED + 1)
    assert 1.9 <= stats.elapsed_seconds < 4.0, "a reachable rate is paced, not raced"
    assert stats.impressions.inserts > 0
    assert scalar(own_db, f"SELECT min(id) FROM impressions WHERE id > {before['impressions']}") == stray_id
    # New facts land on campaigns that existed before this run.
    old_campaign_facts = scalar(
        own_db,
        f"SELECT count(*) FROM impressions WHERE id > {stray_id} AND campaign_id <= {before['campaign']}",
    )
    assert old_campaign_facts > 0


def test_render_progress_is_one_line(first_run: GeneratorStats) -> None:
    line = render_progress(first_run)
    assert "\n" not in line
    assert f"{first_run.events:,}" in line and "/s" in line


def test_change_stream_matches_the_stats_and_keeps_creative_out_of_most_updates(own_db: str) -> None:
    """What Debezium will see, read with Postgres's test_decoding plugin: one change per event
    counted, and campaign updates that do not touch `creative` carry no value for it."""
    if scalar(own_db, "SHOW wal_level") != "logical":
        pytest.skip("the server's wal_level is not logical: no logical decoding to check against")
    slot = f"gen_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(own_db, autocommit=True) as conn:
        try:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [slot])
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("the CDC_POSTGRES_DSN user may not create a replication slot")
        try:
            stats = generate(own_db, rate=5000, duration=2.0, seed=SEED)
            changes = [
                row[0] for row in conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", [slot])
            ]
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    row_changes = [c for c in changes if c.startswith("table public.")]
    assert len(row_changes) == stats.events
    campaign_updates = [c for c in row_changes if c.startswith("table public.campaign: UPDATE")]
    untouched = [c for c in campaign_updates if "creative[text]:unchanged-toast-datum" in c]
    assert len(campaign_updates) == stats.campaigns.updates
    assert len(campaign_updates) - len(untouched) == stats.creative_rewrites > 0
    assert len(untouched) > stats.creative_rewrites


class CommitsBetweenReads:
    """A connection on which another writer commits a campaign with an impression and a click
    right after the campaigns were read: the moment a second generator can hit."""

    def __init__(self, conn: psycopg.Connection, dsn: str) -> None:
        self.conn, self.dsn = conn, dsn

    def transaction(self) -> psycopg.Transaction:
        return self.conn.transaction()

    def execute(self, query: str, params: object = None) -> psycopg.Cursor:
        cursor = self.conn.execute(query, params)
        if query.startswith("SELECT id, advertiser_id"):
            with psycopg.connect(self.dsn) as other:
                ad_id = other.execute("INSERT INTO advertiser (name) VALUES ('late') RETURNING id").fetchone()[0]
                cid = other.execute(
                    "INSERT INTO campaign (advertiser_id, name) VALUES (%s, 'late') RETURNING id", [ad_id]
                ).fetchone()[0]
                imp_id = other.execute(
                    "INSERT INTO impressions (campaign_id) VALUES (%s) RETURNING id", [cid]
                ).fetchone()[0]
                other.execute("INSERT INTO clicks (impression_id, campaign_id) VALUES (%s, %s)", [imp_id, cid])
        return cursor


def test_world_is_read_in_one_snapshot(own_db: str) -> None:
    """A commit between the world's reads must not leave facts of a campaign the world lacks."""
    generate(own_db, rate=2000, duration=0.5, seed=SEED)
    with psycopg.connect(own_db, autocommit=True) as conn:
        world = generator.load_world(CommitsBetweenReads(conn, own_db), Random(SEED))
    # Without one snapshot, load_world raises KeyError on the late campaign's impression.
    assert scalar(own_db, "SELECT max(id) FROM campaign") not in world.campaigns
    assert scalar(own_db, "SELECT max(id) FROM advertiser") not in world.advertisers
    assert len(world.campaigns) == scalar(own_db, "SELECT count(*) FROM campaign") - 1


def test_two_generators_side_by_side(own_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two generators on one database: ids never collide (both draw from the identity sequences)
    and a tick that trips over the other's deletes is rolled back and written again."""
    # Far more deletes than real traffic has, so that the two runs do get in each other's way.
    monkeypatch.setattr(generator, "CAMPAIGN_DELETE_SHARE", 0.001)
    monkeypatch.setattr(generator, "ADVERTISER_DELETE_SHARE", 0.0002)
    generate(own_db, rate=3000, duration=1.0, seed=SEED)  # something to share
    results: dict[int, GeneratorStats] = {}
    failures: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            results[seed] = generate(own_db, rate=4000, duration=3.0, seed=seed)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    for stats in results.values():
        print(render_progress(stats))
        assert stats.events >= 4000 * 3.0
    mismatched = scalar(
        own_db,
        "SELECT count(*) FROM clicks c JOIN impressions i ON i.id = c.impression_id"
        " WHERE c.campaign_id <> i.campaign_id",
    )
    assert mismatched == 0
