"""Realistic, deterministic ad-platform traffic for the CDC source database.

`generate()` plays an ad platform against the Postgres schema in postgres/schema.sql at a
target rate of change events (row inserts + updates + deletes) per second:

* advertisers and campaigns are created, renamed, paused/reactivated/archived, re-bid and
  re-budgeted, and now and then deleted (ON DELETE CASCADE then removes their facts);
* campaign creatives are rewritten with TOAST-sized, incompressible markup, while most
  campaign updates leave `creative` alone, so Debezium emits its unchanged-TOAST placeholder;
* impressions arrive in bulk (COPY), a few of them late (backdated up to a few days, so daily
  KPIs span several UTC dates); clicks follow a few percent of them, seconds later, on the
  impression's campaign; fraudulent impressions and clicks are deleted later, and some costs
  are corrected by UPDATE.

Determinism: everything is drawn from one `random.Random(seed)` and time is simulated: tick i
of the run stands for `start + i * TICK_SECONDS`, whatever the wall clock says. The amount of
work per tick depends only on (rate, duration), never on how fast the machine is: a machine
that cannot keep up takes longer but writes the same rows. So the same seed, rate, duration
and `start` against the same database state give identical table contents; without `start`
the contents are identical up to a shift of every timestamp by the difference in start time.

Ids are explicit (the generator must know an impression's id to click on it or delete it in
the same transaction) but drawn from each table's identity sequence, see `IdAllocator`. A
database that already holds data is continued: its advertisers, campaigns and latest facts
are loaded first. Other writers may work alongside; see `write_tick` for what happens when
a tick trips over their changes.
"""

from __future__ import annotations

import base64
import copy
import heapq
import math
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import accumulate
from random import Random
from typing import Generic, Protocol, TypeVar

import psycopg
from psycopg import errors, sql

# Simulated time is kept as integer microseconds since the epoch: exact and cheap.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROS = 1_000_000
DAY_MICROS = 86_400 * MICROS

TICK_SECONDS = 0.1  # one transaction per tick
TICK_MICROS = round(TICK_SECONDS * MICROS)
PROGRESS_INTERVAL_SECONDS = 1.0

# The mix: each kind of change as a share of all planned events. Impressions fill whatever
# the others (and the clicks, which follow impressions) leave of each tick's budget.
ADVERTISER_INSERT_SHARE = 0.0002
ADVERTISER_RENAME_SHARE = 0.0002
ADVERTISER_DELETE_SHARE = 0.00001
CAMPAIGN_INSERT_SHARE = 0.0003
CAMPAIGN_UPDATE_SHARE = 0.006  # bid, budget, status or name: `creative` untouched
CAMPAIGN_CREATIVE_SHARE = 0.001  # rewrites the TOAST-sized creative
CAMPAIGN_DELETE_SHARE = 0.00004
IMPRESSION_COST_CORRECTION_SHARE = 0.004
CLICK_COST_CORRECTION_SHARE = 0.0015
IMPRESSION_FRAUD_DELETE_SHARE = 0.003
CLICK_FRAUD_DELETE_SHARE = 0.001

# An empty database gets the accounts of a platform that has been running for a while:
# advertisers up to a week old and campaigns older than LATE_HORIZON, so that late impressions
# have campaigns to land on.
INITIAL_ADVERTISERS = 6
INITIAL_CAMPAIGNS = 24
INITIAL_HISTORY_MICROS = 7 * DAY_MICROS
# Never let the traffic dry up: below this many active campaigns, new ones are created.
MIN_ACTIVE_CAMPAIGNS = 8

# Impressions delivered late by partners: created_at up to LATE_HORIZON ago, so the daily
# KPIs always span a few UTC dates (and cross a midnight), not just today. Only campaigns that
# have been running for a while receive them.
LATE_IMPRESSION_SHARE = 0.05
LATE_HORIZON_MICROS = 3 * DAY_MICROS
LATE_MIN_CAMPAIGN_AGE_MICROS = DAY_MICROS // 4
CLICK_DELAY_LOG_MEDIAN = math.log(1.5)  # seconds after the impression, log-normal
CLICK_DELAY_MAX_SECONDS = 120.0
RECENT_WINDOW = 50_000  # how many recent facts are candidates for corrections and fraud deletes

CREATIVE_MIN_CHARS = 9_000  # > 8 kB, far above the ~2 kB TOAST threshold
CREATIVE_MAX_CHARS = 16_000

TABLES = ("advertiser", "campaign", "impressions", "clicks")
CONFLICTS_WITH_OTHER_WRITERS = (errors.ForeignKeyViolation, errors.DeadlockDetected, errors.UniqueViolation)
MAX_TICK_ATTEMPTS = 10


# ----------------------------------------------------------------------------- statistics


@dataclass
class OpCounts:
    inserts: int = 0
    updates: int = 0
    deletes: int = 0

    @property
    def total(self) -> int:
        return self.inserts + self.updates + self.deletes


@dataclass
class GeneratorStats:
    """Change events written so far. Deletes include rows removed by ON DELETE CASCADE
    (also counted separately in `cascaded_deletes`), since Debezium emits an event for each."""

    seed: int
    target_rate: float
    started_at: datetime  # the simulated time of the first tick
    advertisers: OpCounts = field(default_factory=OpCounts)
    campaigns: OpCounts = field(default_factory=OpCounts)
    impressions: OpCounts = field(default_factory=OpCounts)
    clicks: OpCounts = field(default_factory=OpCounts)
    cascaded_deletes: int = 0
    creative_rewrites: int = 0  # campaign updates that rewrote `creative` (in campaigns.updates)
    retried_ticks: int = 0  # ticks rolled back after a conflict with another writer, see write_tick
    elapsed_seconds: float = 0.0

    @property
    def events(self) -> int:
        return sum(c.total for c in (self.advertisers, self.campaigns, self.impressions, self.clicks))

    @property
    def rate(self) -> float:
        """Events per second achieved."""
        return self.events / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


def render_progress(stats: GeneratorStats) -> str:
    """One line: elapsed, events, achieved/target rate, then +inserts ~updates -deletes per table."""

    def per_second(rate: float) -> str:
        return f"{rate:,.0f}/s" if rate >= 100 else f"{rate:.1f}/s"

    def ops(label: str, c: OpCounts) -> str:
        return f"{label} +{c.inserts:,} ~{c.updates:,} -{c.deletes:,}"

    retried = f", {stats.retried_ticks} ticks retried" if stats.retried_ticks else ""
    return " | ".join(
        [
            f"{stats.elapsed_seconds:6.1f}s {stats.events:>11,} events "
            f"{per_second(stats.rate):>10} (target {per_second(stats.target_rate)}, seed {stats.seed}{retried})",
            ops("adv", stats.advertisers),
            ops("camp", stats.campaigns),
            ops("imp", stats.impressions),
            ops("clk", stats.clicks),
        ]
    )


# ----------------------------------------------------------------------------- value helpers


def to_micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def fixed_point(units: int, decimals: int) -> str:
    """An integer amount of 10**-decimals units as exact decimal text (no float rounding)."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**decimals)
    return f"{sign}{whole}.{frac:0{decimals}d}"


def as_decimal(units: int, decimals: int) -> Decimal:
    return Decimal(fixed_point(units, decimals))


# ----------------------------------------------------------------------------- names and creatives

BRANDS = (
    "Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware", "Adatum", "Proseware", "Woodgrove",
    "Alpine", "Bluebird", "Coho", "Lucerne", "Margie's", "Wingtip", "Fourth Coffee", "Humongous",
)  # fmt: skip
INDUSTRIES = (
    "Outdoor", "Travel", "Insurance", "Motors", "Fashion", "Foods", "Games", "Bank", "Fitness",
    "Electronics", "Pharmacy", "Telecom", "Furniture", "Pets", "Books", "Energy",
)  # fmt: skip
SEASONS = ("Spring", "Summer", "Autumn", "Winter", "Black Friday", "Back to School", "Holiday", "Launch")
PRODUCTS = (
    "Sale", "Brand Awareness", "Retargeting", "App Install", "Newsletter", "Loyalty", "Clearance",
    "New Collection", "Lead Gen", "Video Teaser",
)  # fmt: skip
LEGAL_FORMS = ("Group", "Inc.", "GmbH", "Ltd")
CHANNELS = ("Display", "Mobile", "Video", "Native", "Search", "Social", "CTV")
COPY_WORDS = (
    "discover", "save", "today", "exclusive", "offer", "free", "shipping", "limited", "new", "best",
    "quality", "trusted", "fast", "easy", "premium", "deal", "members", "only", "now", "more",
)  # fmt: skip


def advertiser_name(rng: Random) -> str:
    return f"{rng.choice(BRANDS)} {rng.choice(INDUSTRIES)}"


def campaign_name(rng: Random) -> str:
    return f"{rng.choice(SEASONS)} {rng.choice(PRODUCTS)} - {rng.choice(CHANNELS)}"


def creative_markup(rng: Random, campaign_id: int, version: int) -> str:
    """Ad markup of CREATIVE_MIN_CHARS..CREATIVE_MAX_CHARS characters, most of it an inline
    image as base64 of random bytes: pglz cannot compress that, so the value stays far above
    the TOAST threshold and is stored out of line, as real creatives are."""
    headline = " ".join(rng.choice(COPY_WORDS) for _ in range(6)).capitalize()
    body = " ".join(rng.choice(COPY_WORDS) for _ in range(30))
    image_chars = rng.randrange(CREATIVE_MIN_CHARS, CREATIVE_MAX_CHARS)
    image = base64.b64encode(rng.randbytes(image_chars * 3 // 4)).decode("ascii")
    return (
        f'<div class="ad" data-campaign="{campaign_id}" data-version="{version}">'
        f"<h1>{headline}</h1><p>{body}</p>"
        f'<img alt="{headline}" src="data:image/png;base64,{image}"/>'
        f'<a href="https://ads.example.com/click?c={campaign_id}&amp;v={version}">Learn more</a></div>'
    )


# ----------------------------------------------------------------------------- in-memory world


@dataclass(slots=True)
class Advertiser:
    id: int
    name: str
    created_micros: int


@dataclass(slots=True, eq=False)
class Campaign:
    id: int
    advertiser_id: int
    name: str
    bid_units: int  # CPM bid in 1/10,000 of the currency: numeric(12,4)
    budget_cents: int  # numeric(14,2)
    status: str
    created_micros: int
    popularity: float  # relative share of the platform's impressions while active
    ctr: float  # probability that an impression is clicked
    creative_version: int = 0
    alive: bool = True


@dataclass(slots=True, eq=False)
class Impression:
    id: int
    campaign: Campaign
    created_micros: int
    cost_micros: int
    deleted: bool = False

    @property
    def alive(self) -> bool:
        return not self.deleted and self.campaign.alive


@dataclass(slots=True, eq=False)
class Click:
    id: int
    impression: Impression | None  # None when loaded from an earlier run outside the window
    campaign: Campaign
    cost_micros: int
    deleted: bool = False

    @property
    def alive(self) -> bool:
        if self.deleted or not self.campaign.alive:
            return False
        return self.impression is None or self.impression.alive


class Fact(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def alive(self) -> bool: ...


F = TypeVar("F", bound=Fact)
R = TypeVar("R")


class RecentWindow(Generic[F]):
    """The last `capacity` facts written: the candidates for cost corrections and fraud deletes.
    A ring buffer, so picking a random one is O(1) and memory stays bounded."""

    def __init__(self, capacity: int) -> None:
        self._items: list[F] = []
        self._capacity = capacity
        self._next = 0

    def add(self, item: F) -> None:
        if len(self._items) < self._capacity:
            self._items.append(item)
        else:
            self._items[self._next] = item
            self._next = (self._next + 1) % self._capacity

    def sample_alive(self, rng: Random, k: int) -> list[F]:
        """Up to k distinct live items; gives up after a few misses rather than scanning."""
        chosen: dict[int, F] = {}
        for _ in range(4 * k):
            if len(chosen) == k or not self._items:
                break
            item = self._items[rng.randrange(len(self._items))]
            if item.alive:
                chosen[item.id] = item
        return list(chosen.values())


@dataclass
class World:
    """What the generator knows of the database: all dimensions, recent facts, pending clicks."""

    advertisers: dict[int, Advertiser] = field(default_factory=dict)
    campaigns: dict[int, Campaign] = field(default_factory=dict)
    recent_impressions: RecentWindow[Impression] = field(default_factory=lambda: RecentWindow(RECENT_WINDOW))
    recent_clicks: RecentWindow[Click] = field(default_factory=lambda: RecentWindow(RECENT_WINDOW))
    # (due time, impression id, impression): clicks that will happen, inserted once their time comes
    pending_clicks: list[tuple[int, int, Impression]] = field(default_factory=list)

    def campaigns_with_status(self, status: str) -> list[Campaign]:
        return [c for c in self.campaigns.values() if c.status == status]

    def forget_campaign(self, campaign: Campaign) -> None:
        campaign.alive = False  # its facts in the windows and pending clicks die with it
        del self.campaigns[campaign.id]


def new_campaign_traits(rng: Random) -> tuple[float, float]:
    """(popularity, ctr): a few campaigns get most of the traffic, CTRs of a few percent."""
    popularity = rng.lognormvariate(0.0, 1.0)
    ctr = min(0.1, max(0.002, rng.lognormvariate(math.log(0.03), 0.5)))
    return popularity, ctr


def load_world(conn: psycopg.Connection, rng: Random) -> World:
    """Continue on what the database already holds: all advertisers and campaigns, and the most
    recent facts as candidates for corrections and fraud deletes. Read in id order so that the
    same database state always gives the same world (and the same random draws). One snapshot
    for all four reads: another writer's commit between them would leave facts of campaigns
    this world has never seen."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return _read_world(conn, rng)


def _read_world(conn: psycopg.Connection, rng: Random) -> World:
    world = World()
    for ad_id, name, created_at in conn.execute("SELECT id, name, created_at FROM advertiser ORDER BY id"):
        world.advertisers[ad_id] = Advertiser(ad_id, name, to_micros(created_at))
    for cid, ad_id, name, bid, budget, status, created_at in conn.execute(
        "SELECT id, advertiser_id, name, bid_amount, budget, status, created_at FROM campaign ORDER BY id"
    ):
        popularity, ctr = new_campaign_traits(rng)
        world.campaigns[cid] = Campaign(
            cid, ad_id, name, int(bid * 10_000), int(budget * 100), status, to_micros(created_at),
            popularity, ctr, creative_version=1,
        )  # fmt: skip
    impressions: dict[int, Impression] = {}
    for imp_id, cid, created_at, cost in conn.execute(
        "SELECT id, campaign_id, created_at, cost FROM"
        " (SELECT * FROM impressions ORDER BY id DESC LIMIT %s) recent ORDER BY id",
        [RECENT_WINDOW],
    ):
        impression = Impression(imp_id, world.campaigns[cid], to_micros(created_at), int(cost * MICROS))
        impressions[imp_id] = impression
        world.recent_impressions.add(impression)
    for click_id, imp_id, cid, cost in conn.execute(
        "SELECT id, impression_id, campaign_id, cost FROM"
        " (SELECT * FROM clicks ORDER BY id DESC LIMIT %s) recent ORDER BY id",
        [RECENT_WINDOW],
    ):
        click = Click(click_id, impressions.get(imp_id), world.campaigns[cid], int(cost * MICROS))
        world.recent_clicks.add(click)
    return world


# ----------------------------------------------------------------------------- ids


class IdAllocator:
    """Explicit ids, drawn in batches from each table's identity sequence.

    The generator needs ids before the rows exist (a click must name its impression within
    the same COPY batch), so it picks them itself. Taking them from the identity sequence with
    nextval() rather than counting up from max(id) locally means that two generators, or any
    writer that lets the column default, can never be handed the same id: nextval is atomic
    and never returns a value twice. On a fresh database (or after TRUNCATE ... RESTART
    IDENTITY) the sequence starts at max(id) + 1 = 1 and hands out consecutive values to a
    single writer, so the ids are as deterministic as the rest of the data.
    """

    def __init__(self, conn: psycopg.Connection) -> None:
        self._sequences: dict[str, str] = {}
        for table in TABLES:
            (sequence,) = conn.execute("SELECT pg_get_serial_sequence(%s, 'id')", [table]).fetchone()
            self._sequences[table] = sequence
            self._move_sequence_past_max_id(conn, table, sequence)

    @staticmethod
    def _move_sequence_past_max_id(conn: psycopg.Connection, table: str, sequence: str) -> None:
        # Rows inserted with explicit ids (a restore, a test fixture) do not advance the
        # sequence; catch up so that nextval starts at max(id) + 1 at the least.
        conn.execute(
            sql.SQL(
                "SELECT setval(%(seq)s::regclass, m) FROM (SELECT max(id) AS m FROM {}) t"
                " WHERE m > coalesce(pg_sequence_last_value(%(seq)s::regclass), 0)"
            ).format(sql.Identifier(table)),
            {"seq": sequence},
        )

    def take(self, conn: psycopg.Connection, table: str, count: int) -> list[int]:
        if count <= 0:
            return []
        rows = conn.execute(
            "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", [self._sequences[table], count]
        ).fetchall()
        return sorted(row[0] for row in rows)


# ----------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Tick:
    index: int
    sim_micros: int  # simulated time at the start of the tick
    planned_before: int  # events planned for all earlier ticks
    planned_after: int  # ... including this one
    wall_offset: float  # seconds after the start at which this tick should be done

    def share(self, fraction: float) -> int:
        """How many events of a kind that makes up `fraction` of all events fall in this tick.
        Exact in the long run (no random rounding), so short runs still see the rare kinds."""
        return math.floor(fraction * self.planned_after) - math.floor(fraction * self.planned_before)


def ticks(rate: float, duration: float, start_micros: int) -> Iterator[Tick]:
    planned_before = 0
    for i in range(math.ceil(duration / TICK_SECONDS - 1e-9)):
        end = min((i + 1) * TICK_SECONDS, duration)  # the last tick may be shorter
        planned_after = math.floor(rate * end)
        yield Tick(
            index=i,
            sim_micros=start_micros + i * TICK_MICROS,
            planned_before=planned_before,
            planned_after=planned_after,
            wall_offset=end,
        )
        planned_before = planned_after


# ----------------------------------------------------------------------------- one tick of traffic


class TrafficWriter:
    """Writes one tick of traffic in the caller's transaction and counts what it wrote."""

    def __init__(
        self, conn: psycopg.Connection, rng: Random, world: World, ids: IdAllocator, stats: GeneratorStats
    ) -> None:
        self.conn = conn
        self.rng = rng
        self.world = world
        self.ids = ids
        self.stats = stats
        self.now = 0  # simulated time of the current tick, in microseconds

    def run_tick(self, tick: Tick) -> None:
        self.now = tick.sim_micros
        if tick.index == 0 and not self.world.campaigns:
            self._open_platform()
        self._keep_traffic_flowing()
        self._create_advertisers(tick.share(ADVERTISER_INSERT_SHARE))
        self._rename_advertisers(tick.share(ADVERTISER_RENAME_SHARE))
        self._create_campaigns(tick.share(CAMPAIGN_INSERT_SHARE))
        self._update_campaigns(tick.share(CAMPAIGN_UPDATE_SHARE))
        self._rewrite_creatives(tick.share(CAMPAIGN_CREATIVE_SHARE))
        self._correct_impression_costs(tick.share(IMPRESSION_COST_CORRECTION_SHARE))
        self._correct_click_costs(tick.share(CLICK_COST_CORRECTION_SHARE))
        self._delete_fraudulent_clicks(tick.share(CLICK_FRAUD_DELETE_SHARE))
        self._delete_fraudulent_impressions(tick.share(IMPRESSION_FRAUD_DELETE_SHARE))
        self._delete_campaigns(tick.share(CAMPAIGN_DELETE_SHARE))
        self._delete_advertisers(tick.share(ADVERTISER_DELETE_SHARE))
        # Facts fill the rest of the budget. Cascades and the bootstrap can overdraw it; the
        # next ticks then write fewer facts, so the achieved rate stays at the target.
        self._insert_due_clicks(tick.planned_after - self.stats.events)
        self._insert_impressions(tick.planned_after - self.stats.events)

    def _jitter(self) -> int:
        """A moment within the current tick."""
        return self.now + self.rng.randrange(TICK_MICROS)

    # --- advertisers and campaigns

    def _open_platform(self) -> None:
        """An empty database: the accounts a platform has had for a few days already."""
        self._create_advertisers(INITIAL_ADVERTISERS, backdated=True)
        self._create_campaigns(INITIAL_CAMPAIGNS, backdated=True)

    def _keep_traffic_flowing(self) -> None:
        missing = MIN_ACTIVE_CAMPAIGNS - len(self.world.campaigns_with_status("active"))
        self._create_campaigns(missing)

    def _create_advertisers(self, count: int, backdated: bool = False) -> None:
        """New accounts; backdated ones signed up between INITIAL_HISTORY and LATE_HORIZON ago."""
        new = []
        for ad_id in self.ids.take(self.conn, "advertiser", count):
            if backdated:
                created = self.now - self.rng.randrange(LATE_HORIZON_MICROS, INITIAL_HISTORY_MICROS)
            else:
                created = self._jitter()
            new.append(Advertiser(ad_id, advertiser_name(self.rng), created))
        if not new:
            return
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO advertiser (id, name, created_at, updated_at) VALUES (%s, %s, %s, %s)",
                [(a.id, a.name, from_micros(a.created_micros), from_micros(a.created_micros)) for a in new],
            )
        for advertiser in new:
            self.world.advertisers[advertiser.id] = advertiser
        self.stats.advertisers.inserts += len(new)

    def _rename_advertisers(self, count: int) -> None:
        if count <= 0 or not self.world.advertisers:
            return
        chosen = {a.id: a for a in self.rng.choices(list(self.world.advertisers.values()), k=count)}
        for advertiser in chosen.values():
            advertiser.name = f"{advertiser_name(self.rng)} {self.rng.choice(LEGAL_FORMS)}"  # rebranded
        cur = self.conn.execute(
            "UPDATE advertiser AS a SET name = v.name, updated_at = v.updated_at"
            " FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[]) AS v(id, name, updated_at)"
            " WHERE a.id = v.id",
            [
                list(chosen),
                [a.name for a in chosen.values()],
                [from_micros(self._jitter()) for _ in chosen],
            ],
        )
        self.stats.advertisers.updates += cur.rowcount

    def _create_campaigns(self, count: int, backdated: bool = False) -> None:
        """New campaigns; backdated ones started between their advertiser's sign-up and
        LATE_HORIZON ago, so late impressions can land on any of the last few days."""
        if count <= 0:
            return
        if not self.world.advertisers:
            self._create_advertisers(1, backdated)
        owners = list(self.world.advertisers.values())
        new = []
        for cid in self.ids.take(self.conn, "campaign", count):
            owner = self.rng.choice(owners)
            if backdated and owner.created_micros < self.now - LATE_HORIZON_MICROS:
                created = self.rng.randrange(owner.created_micros, self.now - LATE_HORIZON_MICROS)
            else:
                created = max(owner.created_micros, self._jitter())
            popularity, ctr = new_campaign_traits(self.rng)
            bid_units = round(min(25.0, max(0.5, self.rng.lognormvariate(math.log(3.0), 0.5))) * 10_000)
            budget_cents = self.rng.randrange(5, 500) * 10_000
            campaign = Campaign(
                id=cid,
                advertiser_id=owner.id,
                name=campaign_name(self.rng),
                bid_units=bid_units,
                budget_cents=budget_cents,
                status="active",
                created_micros=created,
                popularity=popularity,
                ctr=ctr,
                creative_version=1,
            )
            new.append(campaign)
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO campaign (id, advertiser_id, name, bid_amount, budget, status, creative,"
                " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [self._campaign_row(c) for c in new],
            )
        for campaign in new:
            self.world.campaigns[campaign.id] = campaign
        self.stats.campaigns.inserts += len(new)

    def _campaign_row(self, c: Campaign) -> tuple:
        created_at = from_micros(c.created_micros)
        creative = creative_markup(self.rng, c.id, c.creative_version)
        bid, budget = as_decimal(c.bid_units, 4), as_decimal(c.budget_cents, 2)
        return (c.id, c.advertiser_id, c.name, bid, budget, c.status, creative, created_at, created_at)

    def _update_campaigns(self, count: int) -> None:
        """Everyday account management. These updates leave `creative` alone: in the WAL the
        row keeps pointing at the old TOAST value, and Debezium sends a placeholder for it."""
        if count <= 0 or not self.world.campaigns:
            return
        candidates = list(self.world.campaigns.values())
        changed: dict[int, Campaign] = {}
        for _ in range(count):
            campaign = self.rng.choice(candidates)
            self._change_something(campaign)
            changed[campaign.id] = campaign  # a campaign changed twice is written once
        # All non-TOAST columns from our copy of the row, one statement for the whole tick.
        cur = self.conn.execute(
            "UPDATE campaign AS c SET name = v.name, bid_amount = v.bid_amount, budget = v.budget,"
            " status = v.status, updated_at = v.updated_at"
            " FROM unnest(%s::bigint[], %s::text[], %s::numeric[], %s::numeric[], %s::text[],"
            " %s::timestamptz[]) AS v(id, name, bid_amount, budget, status, updated_at)"
            " WHERE c.id = v.id",
            [
                list(changed),
                [c.name for c in changed.values()],
                [as_decimal(c.bid_units, 4) for c in changed.values()],
                [as_decimal(c.budget_cents, 2) for c in changed.values()],
                [c.status for c in changed.values()],
                [from_micros(self._jitter()) for _ in changed],
            ],
        )
        self.stats.campaigns.updates += cur.rowcount

    def _change_something(self, campaign: Campaign) -> None:
        roll = self.rng.random()
        if roll < 0.4:  # bid adjustments are the most frequent change
            factor = self.rng.uniform(0.8, 1.25)
            campaign.bid_units = min(250_000, max(5_000, round(campaign.bid_units * factor)))
        elif roll < 0.7:
            campaign.budget_cents = max(10_000, round(campaign.budget_cents * self.rng.uniform(0.7, 1.5) / 100) * 100)
        elif roll < 0.9:
            campaign.status = self._next_status(campaign.status)
        else:
            campaign.name = campaign_name(self.rng)

    def _next_status(self, status: str) -> str:
        if status == "active":
            return "archived" if self.rng.random() < 0.1 else "paused"
        if status == "paused":
            return "active" if self.rng.random() < 0.8 else "archived"
        return "paused"  # archived campaigns are sometimes brought back, paused at first

    def _rewrite_creatives(self, count: int) -> None:
        if count <= 0 or not self.world.campaigns:
            return
        chosen = {c.id: c for c in self.rng.choices(list(self.world.campaigns.values()), k=count)}
        creatives = []
        for campaign in chosen.values():
            campaign.creative_version += 1
            creatives.append(creative_markup(self.rng, campaign.id, campaign.creative_version))
        cur = self.conn.execute(
            "UPDATE campaign AS c SET creative = v.creative, updated_at = v.updated_at"
            " FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[]) AS v(id, creative, updated_at)"
            " WHERE c.id = v.id",
            [list(chosen), creatives, [from_micros(self._jitter()) for _ in chosen]],
        )
        self.stats.campaigns.updates += cur.rowcount
        self.stats.creative_rewrites += cur.rowcount

    def _delete_campaigns(self, count: int) -> None:
        if count <= 0 or not self.world.campaigns:
            return
        chosen = {c.id: c for c in self._deletion_victims(list(self.world.campaigns.values()), count)}
        self._count_cascade(list(chosen))
        cur = self.conn.execute("DELETE FROM campaign WHERE id = ANY(%s)", [list(chosen)])
        self.stats.campaigns.deletes += cur.rowcount
        for campaign in chosen.values():
            self.world.forget_campaign(campaign)

    def _delete_advertisers(self, count: int) -> None:
        if count <= 0 or not self.world.advertisers:
            return
        chosen = {a.id for a in self._deletion_victims(list(self.world.advertisers.values()), count)}
        doomed = [c for c in self.world.campaigns.values() if c.advertiser_id in chosen]
        # Ask the database rather than our world: other writers may have added campaigns.
        rows = self.conn.execute("SELECT id FROM campaign WHERE advertiser_id = ANY(%s)", [sorted(chosen)])
        campaign_ids = [row[0] for row in rows]
        self._count_cascade(campaign_ids)
        self.stats.campaigns.deletes += len(campaign_ids)
        self.stats.cascaded_deletes += len(campaign_ids)
        cur = self.conn.execute("DELETE FROM advertiser WHERE id = ANY(%s)", [sorted(chosen)])
        self.stats.advertisers.deletes += cur.rowcount
        for campaign in doomed:
            self.world.forget_campaign(campaign)
        for ad_id in sorted(chosen):
            del self.world.advertisers[ad_id]

    def _deletion_victims(self, newest_last: Sequence[R], count: int) -> list[R]:
        """Hard deletes hit accounts that barely ran (duplicates, test accounts, failed launches):
        established ones get archived instead. So victims come from the newest quarter, which
        keeps the cascades to a realistic size."""
        newest = newest_last[-max(1, len(newest_last) // 4) :]
        return self.rng.choices(newest, k=count)

    def _count_cascade(self, campaign_ids: list[int]) -> None:
        """Count the facts ON DELETE CASCADE is about to remove: each is a change event too."""
        impressions, clicks = self.conn.execute(
            "SELECT (SELECT count(*) FROM impressions WHERE campaign_id = ANY(%(ids)s)),"
            "       (SELECT count(*) FROM clicks WHERE campaign_id = ANY(%(ids)s))",
            {"ids": campaign_ids},
        ).fetchone()
        self.stats.impressions.deletes += impressions
        self.stats.clicks.deletes += clicks
        self.stats.cascaded_deletes += impressions + clicks

    # --- facts

    def _correct_impression_costs(self, count: int) -> None:
        """Auction reconciliation lowers a price; invalid traffic is refunded to zero."""
        chosen = self.world.recent_impressions.sample_alive(self.rng, count)
        if not chosen:
            return
        for impression in chosen:
            impression.cost_micros = self._corrected(impression.cost_micros)
        cur = self.conn.execute(
            "UPDATE impressions AS i SET cost = v.cost"
            " FROM unnest(%s::bigint[], %s::numeric[]) AS v(id, cost) WHERE i.id = v.id",
            [[i.id for i in chosen], [as_decimal(i.cost_micros, 6) for i in chosen]],
        )
        self.stats.impressions.updates += cur.rowcount

    def _correct_click_costs(self, count: int) -> None:
        chosen = self.world.recent_clicks.sample_alive(self.rng, count)
        if not chosen:
            return
        for click in chosen:
            click.cost_micros = self._corrected(click.cost_micros)
        cur = self.conn.execute(
            "UPDATE clicks AS c SET cost = v.cost"
            " FROM unnest(%s::bigint[], %s::numeric[]) AS v(id, cost) WHERE c.id = v.id",
            [[c.id for c in chosen], [as_decimal(c.cost_micros, 6) for c in chosen]],
        )
        self.stats.clicks.updates += cur.rowcount

    def _corrected(self, cost_micros: int) -> int:
        if self.rng.random() < 0.1:
            return 0
        return round(cost_micros * self.rng.uniform(0.5, 0.98))

    def _delete_fraudulent_clicks(self, count: int) -> None:
        chosen = self.world.recent_clicks.sample_alive(self.rng, count)
        if not chosen:
            return
        cur = self.conn.execute("DELETE FROM clicks WHERE id = ANY(%s)", [[c.id for c in chosen]])
        self.stats.clicks.deletes += cur.rowcount
        for click in chosen:
            click.deleted = True

    def _delete_fraudulent_impressions(self, count: int) -> None:
        chosen = self.world.recent_impressions.sample_alive(self.rng, count)
        if not chosen:
            return
        ids = [i.id for i in chosen]
        # Their clicks go first, explicitly, so the count is exact (the cascade would do it too).
        cur = self.conn.execute("DELETE FROM clicks WHERE impression_id = ANY(%s)", [ids])
        self.stats.clicks.deletes += cur.rowcount
        cur = self.conn.execute("DELETE FROM impressions WHERE id = ANY(%s)", [ids])
        self.stats.impressions.deletes += cur.rowcount
        for impression in chosen:
            impression.deleted = True  # its pending clicks will never happen

    def _insert_impressions(self, count: int) -> None:
        active = self.world.campaigns_with_status("active")
        if count <= 0 or not active:
            return
        # Late deliveries need a campaign that already ran back then, so they come from the
        # established campaigns only; if there are none, everything is on time.
        established = [c for c in active if c.created_micros < self.now - LATE_MIN_CAMPAIGN_AGE_MICROS]
        late = math.floor(count * LATE_IMPRESSION_SHARE + self.rng.random()) if established else 0
        placements = [(c, False) for c in self._pick_by_popularity(active, count - late)]
        placements += [(c, True) for c in self._pick_by_popularity(established, late)]
        lines = []
        ids = self.ids.take(self.conn, "impressions", count)
        for imp_id, (campaign, is_late) in zip(ids, placements, strict=True):
            impression = self._new_impression(imp_id, campaign, is_late)
            lines.append(
                f"{imp_id}\t{campaign.id}\t{from_micros(impression.created_micros).isoformat()}"
                f"\t{fixed_point(impression.cost_micros, 6)}\n"
            )
        self._copy("impressions (id, campaign_id, created_at, cost)", lines)
        self.stats.impressions.inserts += len(lines)

    def _pick_by_popularity(self, campaigns: list[Campaign], count: int) -> list[Campaign]:
        if count <= 0:
            return []
        return self.rng.choices(campaigns, cum_weights=list(accumulate(c.popularity for c in campaigns)), k=count)

    def _new_impression(self, imp_id: int, campaign: Campaign, is_late: bool) -> Impression:
        rng = self.rng
        if is_late:  # any moment since the campaign started, at most LATE_HORIZON ago
            earliest = max(campaign.created_micros, self.now - LATE_HORIZON_MICROS)
            created = rng.randrange(earliest, self.now)
        else:
            created = self._jitter()
        # Second-price auction: the price paid is some way below the CPM bid; per impression,
        # in micro-units: bid_units / 10_000 / 1_000 * 1_000_000 = bid_units / 10.
        cost_micros = max(1, round(campaign.bid_units * rng.uniform(0.35, 1.0) / 10))
        impression = Impression(imp_id, campaign, created, cost_micros)
        self.world.recent_impressions.add(impression)
        if rng.random() < campaign.ctr:
            delay = min(CLICK_DELAY_MAX_SECONDS, rng.lognormvariate(CLICK_DELAY_LOG_MEDIAN, 1.2))
            heapq.heappush(self.world.pending_clicks, (created + round(delay * MICROS), imp_id, impression))
        return impression

    def _insert_due_clicks(self, budget: int) -> None:
        """Clicks whose moment has come (by the end of this tick), on impressions still alive."""
        due: list[tuple[int, Impression]] = []
        pending = self.world.pending_clicks
        tick_end = self.now + TICK_MICROS
        while pending and len(due) < budget and pending[0][0] < tick_end:
            click_at, _, impression = heapq.heappop(pending)
            if impression.alive:
                due.append((click_at, impression))
        if not due:
            return
        lines = []
        click_ids = self.ids.take(self.conn, "clicks", len(due))
        for click_id, (click_at, impression) in zip(click_ids, due, strict=True):
            campaign = impression.campaign
            cost_micros = round(campaign.bid_units * self.rng.uniform(0.05, 0.4) * 100)  # CPC
            self.world.recent_clicks.add(Click(click_id, impression, campaign, cost_micros))
            lines.append(
                f"{click_id}\t{impression.id}\t{campaign.id}\t{from_micros(click_at).isoformat()}"
                f"\t{fixed_point(cost_micros, 6)}\n"
            )
        self._copy("clicks (id, impression_id, campaign_id, created_at, cost)", lines)
        self.stats.clicks.inserts += len(lines)

    def _copy(self, target: str, lines: list[str]) -> None:
        # Text COPY of preformatted lines: the values are numbers and timestamps, nothing to escape.
        with self.conn.cursor() as cur, cur.copy(f"COPY {target} FROM STDIN") as copy_in:
            copy_in.write("".join(lines))


# ----------------------------------------------------------------------------- the run


def generate(
    dsn: str,
    rate: float,
    duration: float,
    seed: int | None = None,
    progress: Callable[[GeneratorStats], None] | None = None,
    *,
    start: datetime | None = None,
) -> GeneratorStats:
    """Write `rate` change events per second for `duration` seconds of ad traffic into `dsn`.

    `seed` makes the data reproducible (a random one is drawn, and reported in the stats, if
    None). `start` (timezone-aware) is the simulated time of the first tick (default: now);
    pin it too for byte-identical timestamps across runs. `progress` is called about once a second with a
    snapshot of the stats. The same (seed, rate, duration) always writes the same rows: if the
    machine cannot keep up, the run takes longer than `duration` instead of writing fewer rows.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be positive (got rate={rate}, duration={duration})")
    if start is not None and start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    seed = secrets.randbits(32) if seed is None else seed
    start_micros = to_micros(start or datetime.now(UTC))
    stats = GeneratorStats(seed=seed, target_rate=rate, started_at=from_micros(start_micros))
    rng = Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        writer = TrafficWriter(conn, rng, load_world(conn, rng), IdAllocator(conn), stats)
        began = time.monotonic()
        last_report = began
        for tick in ticks(rate, duration, start_micros):
            write_tick(writer, tick)
            now = time.monotonic()
            writer.stats.elapsed_seconds = now - began
            if progress is not None and now - last_report >= PROGRESS_INTERVAL_SECONDS:
                progress(copy.deepcopy(writer.stats))
                last_report = now
            # Pace: wait for this tick's slot; when behind, go straight on to catch up.
            time.sleep(max(0.0, began + tick.wall_offset - now))
        writer.stats.elapsed_seconds = time.monotonic() - began
    return writer.stats


def write_tick(writer: TrafficWriter, tick: Tick) -> None:
    """One tick in one transaction. Alone on the database this never fails; next to other
    writers (another generator, say) a tick can trip over their changes: a campaign it writes
    impressions for was just deleted, both lock the same rows in opposite order, or a writer
    inserted explicit ids ahead of the sequence. Then our picture of the database is stale:
    reload it, move the sequences past the ids in use, and write the tick again."""
    for attempt in range(1, MAX_TICK_ATTEMPTS + 1):
        counted_before = copy.deepcopy(writer.stats)
        try:
            with writer.conn.transaction():
                writer.run_tick(tick)
            return
        except CONFLICTS_WITH_OTHER_WRITERS:
            if attempt == MAX_TICK_ATTEMPTS:
                raise
            writer.stats = counted_before  # the rolled-back tick wrote nothing
            writer.stats.retried_ticks += 1
            # Give the other writer's transaction time to commit, so the reload sees it.
            time.sleep(TICK_SECONDS / 2 * attempt)
            writer.world = load_world(writer.conn, writer.rng)
            writer.ids = IdAllocator(writer.conn)
