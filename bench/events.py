"""Benchmark data: Debezium-shaped Avro change events produced straight into fresh Kafka topics,
and the Postgres state they describe (the ground truth `cdc_dev.verify.compare` checks against).

Why not the real generator and Debezium: the stack's Debezium sustains a few thousand events per
second here, so two million events would take many minutes; the consumer would be measured
against an idle pipe. So the benchmark plays Debezium itself:

* the writer schemas are the ones the stack's Debezium registered for its own topics
  (`<debezium prefix>.public.<table>-value` / `-key`), re-registered for the benchmark's topic
  prefix (only the record namespaces change, as they would for a connector with that prefix);
* values are written with an encoder compiled from those schemas (bench/avro_codec.py), checked
  byte for byte against real Debezium messages and against fastavro before anything is produced;
* keys, headers, partitioning (murmur2 of the key, as Kafka's Java producer), record timestamps
  and transactions (Debezium runs with exactly-once support: one transaction per poll of at most
  2048 records) are those of the stack's Debezium;
* the changes follow Postgres semantics for the schema in postgres/schema.sql: facts have
  REPLICA IDENTITY FULL (full before-images), dimensions DEFAULT (an update has no before-image,
  a delete's before-image is the key plus Debezium's filler values, and an update that leaves the
  TOASTed `creative` alone carries the unchanged-TOAST placeholder); deletes are followed by
  tombstones.

The world keeps the final state of every row, which `write_ground_truth` copies into a Postgres
schema of its own, so the ClickHouse result can be compared with `cdc_dev.verify.compare`.
"""

from __future__ import annotations

import io
import json
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random
from typing import Any

import fastavro
import psycopg
import requests
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.avro_codec import compile_encoder
from bench.avro_codec import encode_string as enc_str
from bench.avro_codec import zigzag_varint as zz
from cdc_dev.generate import (
    CREATIVE_MAX_CHARS,
    CREATIVE_MIN_CHARS,
    advertiser_name,
    campaign_name,
    creative_markup,
    fixed_point,
)

TABLES = ("advertiser", "campaign", "impressions", "clicks")
PLACEHOLDER = "__debezium_unavailable_value"
EPOCH_TEXT = "1970-01-01T00:00:00.000000Z"
PARTITIONS = 4  # topic.creation.default.partitions of connectors/debezium-postgres.json
MAX_TRANSACTION = 2048  # Connect's max.batch.size: one producer transaction per poll

# The mix: share of change events (tombstones come on top of deletes). Mostly impressions and
# clicks; dimension shares as in cdc_dev/generate.py.
MIX = (
    ("impression_insert", 0.8894),
    ("click_insert", 0.08),
    ("impression_update", 0.008),
    ("impression_delete", 0.006),
    ("click_update", 0.003),
    ("click_delete", 0.002),
    ("campaign_update", 0.008),
    ("campaign_creative", 0.001),
    ("campaign_insert", 0.001),
    ("campaign_delete", 0.0002),
    ("advertiser_insert", 0.0002),
    ("advertiser_rename", 0.0006),
    ("advertiser_delete", 0.00004),
)
SIM_EVENTS_PER_SECOND = 10_000  # simulated time: created_at / commit timestamps advance at this rate
LATE_SHARE = 0.05
LATE_HORIZON_US = 3 * 86_400_000_000
RECENT = 50_000
INITIAL_ADVERTISERS = 40
INITIAL_CAMPAIGNS = 400


# ----------------------------------------------------------------------------- schemas


@dataclass
class TableSchema:
    table: str
    topic: str
    value_raw: dict[str, Any]
    key_raw: dict[str, Any]
    value_id: int
    key_id: int
    encode_value: Callable[[dict], bytes] = field(repr=False)
    encode_key: Callable[[dict], bytes] = field(repr=False)
    encode_row: Callable[[dict], bytes] = field(repr=False)

    @property
    def value_header(self) -> bytes:
        return b"\x00" + self.value_id.to_bytes(4, "big")

    @property
    def key_header(self) -> bytes:
        return b"\x00" + self.key_id.to_bytes(4, "big")


# The columns of postgres/schema.sql, which the simulated world writes.
COLUMNS = {
    "advertiser": ["id", "name", "created_at", "updated_at"],
    "campaign": [
        "id", "advertiser_id", "name", "bid_amount", "budget", "status", "creative", "created_at", "updated_at",
    ],
    "impressions": ["id", "campaign_id", "created_at", "cost"],
    "clicks": ["id", "impression_id", "campaign_id", "created_at", "cost"],
}  # fmt: skip


def _value_fields(envelope: dict) -> list[str]:
    before = next(f for f in envelope["fields"] if f["name"] == "before")["type"]
    record = next(b for b in before if isinstance(b, dict))
    return [f["name"] for f in record["fields"]]


def template_schemas(registry_url: str, debezium_prefix: str) -> dict[str, tuple[dict, dict]]:
    """The writer schemas (value, key) the stack's Debezium registered, per source table: the
    newest version whose columns are those of postgres/schema.sql (a stack whose tables were
    altered, by the schema-evolution tests say, has later versions too)."""
    out = {}
    for table in TABLES:
        pair = []
        for kind in ("value", "key"):
            subject = f"{registry_url}/subjects/{debezium_prefix}.public.{table}-{kind}/versions"
            response = requests.get(subject, timeout=10)
            if response.status_code == 404:
                raise LookupError(f"{debezium_prefix}.public.{table}-{kind}")
            response.raise_for_status()
            chosen = None
            for version in sorted(response.json(), reverse=True):
                schema = json.loads(requests.get(f"{subject}/{version}", timeout=10).json()["schema"])
                if kind == "key" or _value_fields(schema) == COLUMNS[table]:
                    chosen = schema
                    break
            if chosen is None:
                raise LookupError(f"{debezium_prefix}.public.{table}-{kind} with the columns {COLUMNS[table]}")
            pair.append(chosen)
        out[table] = (pair[0], pair[1])
    return out


def _renamed(schema: dict, old_prefix: str, new_prefix: str) -> dict:
    """The schema Debezium would register under another topic prefix: only names change."""
    text = json.dumps(schema, separators=(",", ":"))
    return json.loads(text.replace(f'"{old_prefix}.public.', f'"{new_prefix}.public.'))


def register(registry_url: str, subject: str, schema: dict) -> int:
    response = requests.post(
        f"{registry_url}/subjects/{subject}/versions",
        json={"schema": json.dumps(schema, separators=(",", ":"))},
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        timeout=30,
    )
    response.raise_for_status()
    return int(response.json()["id"])


def bench_schemas(
    registry_url: str, templates: dict[str, tuple[dict, dict]], debezium_prefix: str, prefix: str
) -> dict[str, TableSchema]:
    out = {}
    for table, (value, key) in templates.items():
        value = _renamed(value, debezium_prefix, prefix)
        key = _renamed(key, debezium_prefix, prefix)
        topic = f"{prefix}.public.{table}"
        out[table] = TableSchema(
            table,
            topic,
            value,
            key,
            register(registry_url, f"{topic}-value", value),
            register(registry_url, f"{topic}-key", key),
            compile_encoder(value),
            compile_encoder(key),
            compile_encoder(_row_schema(value)),
        )
    return out


def _row_schema(envelope: dict) -> dict:
    before = next(f for f in envelope["fields"] if f["name"] == "before")["type"]
    return next(b for b in before if isinstance(b, dict) and b.get("type") == "record")


# ----------------------------------------------------------------------------- byte compatibility


@dataclass
class CompatReport:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Messages that are not Debezium's (poison: not the wire format, an unknown schema id, a body
    # their schema does not read), by reason: skipped, not compared.
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checked) and not self.problems

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def check_against_real(
    real: list[tuple[str, bytes | None, bytes | None]],
    writer_schema: Callable[[int], dict],
    report: CompatReport,
    label: str,
) -> list[tuple[str, bytes | None, bytes]]:
    """Re-encode real Debezium messages (table, key, value), each with its own writer schema,
    with the benchmark's encoder: the Avro bodies must come out byte for byte identical. A
    stack's topics may hold poison (anything a producer wrote there): such messages are counted
    in `report.skipped` and left out. The messages compared, in order."""
    compared = []
    for table, key, value in real:
        decoded = []
        for kind, data in (("value", value), ("key", key)):
            if data is None:
                continue
            if not _wire_format(data):
                report.skip(f"{label}: not the wire format")
                break
            try:
                schema = writer_schema(int.from_bytes(data[1:5], "big"))
            except (LookupError, requests.HTTPError):
                report.skip(f"{label}: unknown schema id")
                break
            try:
                record = fastavro.schemaless_reader(io.BytesIO(data[5:]), fastavro.parse_schema(schema))
            except Exception:  # whatever a body its schema does not read raises
                report.skip(f"{label}: body unreadable with its schema")
                break
            decoded.append((kind, data, schema, record))
        else:
            for kind, data, schema, record in decoded:
                ours = compile_encoder(schema)(record)
                name = f"{label} {table} {kind} op={record.get('op', '-')}"
                if ours == data[5:]:
                    report.checked.append(name)
                else:
                    report.problems.append(
                        f"{name}: re-encoded bytes differ ({ours.hex()[:80]} vs {data[5:].hex()[:80]})"
                    )
            if value is not None:
                compared.append((table, key, value))
    return compared


def _wire_format(data: bytes) -> bool:
    """The Confluent wire format's header: magic byte 0, then a 4-byte schema id."""
    return len(data) >= 5 and data[0] == 0


def debezium_placed(partitioned: list[tuple[str, int, bytes | None]], report: CompatReport, label: str):
    """The (topic, partition, key) of records Kafka Connect placed: keys in the wire format (or
    none). Another producer's records (poison a test wrote) were placed by its own partitioner;
    they are counted in `report.skipped` and left out of the partitioner check."""
    placed = [(t, p, key) for t, p, key in partitioned if key is None or _wire_format(key)]
    for _ in range(len(partitioned) - len(placed)):
        report.skip(f"{label}: a key not in the wire format, left out of the partitioner check")
    return placed


def registry_schema(registry_url: str) -> Callable[[int], dict]:
    cache: dict[int, dict] = {}

    def get(schema_id: int) -> dict:
        if schema_id not in cache:
            response = requests.get(f"{registry_url}/schemas/ids/{schema_id}", timeout=10)
            response.raise_for_status()
            cache[schema_id] = json.loads(response.json()["schema"])
        return cache[schema_id]

    return get


def check_against_fastavro(schemas: dict[str, TableSchema], samples: list[tuple[str, bytes]], report: CompatReport):
    """Produced bodies decode with fastavro (the registered schema) and fastavro writes them back
    identically: the encoder writes canonical Avro for that schema."""
    for table, value in samples:
        parsed = fastavro.parse_schema(schemas[table].value_raw)
        record = fastavro.schemaless_reader(io.BytesIO(value[5:]), parsed)
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        name = f"produced {table} op={record['op']}"
        if buf.getvalue() == value[5:] and value[:5] == schemas[table].value_header:
            report.checked.append(name)
        else:
            report.problems.append(f"{name}: fastavro does not round-trip the produced bytes")


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Kafka's Java default partitioner for keyed records (librdkafka's `murmur2_random`)."""
    length = len(key)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(length // 4):
        k = int.from_bytes(key[i * 4 : i * 4 + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = key[length // 4 * 4 :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


# ----------------------------------------------------------------------------- the world


_TS_CACHE: dict[int, str] = {}


def _ts(us: int) -> str:
    """io.debezium.time.ZonedTimestamp of a timestamptz: UTC, microseconds, 'Z'."""
    seconds, micros = divmod(us, 1_000_000)
    head = _TS_CACHE.get(seconds)
    if head is None:
        if len(_TS_CACHE) > 500_000:
            _TS_CACHE.clear()
        head = _TS_CACHE[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{head}.{micros:06d}Z"


@dataclass
class Counts:
    events: int = 0
    messages: int = 0
    tombstones: int = 0
    bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_table: dict[str, int] = field(default_factory=dict)


class World:
    """The source database, simulated: emits each change as Debezium would and keeps the rows."""

    def __init__(self, seed: int, start_us: int, emit: Callable[[str, str, dict | None, dict | None, int], None]):
        self.rng = Random(seed)
        self.now_us = start_us
        self.emit = emit  # (table, op, before, after, key id)
        self.advertisers: dict[int, list] = {}  # id -> [name, created_us, updated_us]
        self.empty_advertisers: set[int] = set()  # never get campaigns: deletable
        self.campaigns: dict[int, list] = {}  # id -> [adv, name, bid, budget, status, creative, created, updated]
        self.idle_campaigns: set[int] = set()  # never get traffic: deletable
        self.traffic_campaigns: list[int] = []
        self.old_campaigns: list[int] = []  # old enough for late impressions
        self.next_ids = dict.fromkeys(TABLES, 1)
        # Facts as columns (index = id - 1): campaign, created_us, cost (micro units), alive.
        self.imp_campaign = array("q")
        self.imp_created = array("q")
        self.imp_cost = array("q")
        self.imp_alive = bytearray()
        self.imp_clicks = array("l")
        self.clk_impression = array("q")
        self.clk_campaign = array("q")
        self.clk_created = array("q")
        self.clk_cost = array("q")
        self.clk_alive = bytearray()
        self.recent_imps: list[int] = []
        self.recent_clks: list[int] = []
        self.creative_versions = 0

    # -- rows in Debezium's shape -----------------------------------------------------------
    def _advertiser_row(self, aid: int) -> dict:
        name, created, updated = self.advertisers[aid]
        return {"id": aid, "name": name, "created_at": _ts(created), "updated_at": _ts(updated)}

    def _campaign_row(self, cid: int, toast: bool = False) -> dict:
        adv, name, bid, budget, status, creative, created, updated = self.campaigns[cid]
        return {
            "id": cid,
            "advertiser_id": adv,
            "name": name,
            "bid_amount": bid,
            "budget": budget,
            "status": status,
            "creative": PLACEHOLDER if toast else creative,
            "created_at": _ts(created),
            "updated_at": _ts(updated),
        }

    def _imp_row(self, i: int) -> dict:
        j = i - 1
        return {
            "id": i,
            "campaign_id": self.imp_campaign[j],
            "created_at": _ts(self.imp_created[j]),
            "cost": self.imp_cost[j],
        }

    def _clk_row(self, i: int) -> dict:
        j = i - 1
        return {
            "id": i,
            "impression_id": self.clk_impression[j],
            "campaign_id": self.clk_campaign[j],
            "created_at": _ts(self.clk_created[j]),
            "cost": self.clk_cost[j],
        }

    # -- dimensions ---------------------------------------------------------------------------
    def _new_id(self, table: str) -> int:
        i = self.next_ids[table]
        self.next_ids[table] = i + 1
        return i

    def add_advertiser(self, op: str, empty: bool, backdate_us: int = 0) -> None:
        aid = self._new_id("advertiser")
        created = self.now_us - backdate_us
        self.advertisers[aid] = [advertiser_name(self.rng), created, created]
        if empty:
            self.empty_advertisers.add(aid)
        self.emit("advertiser", op, None, self._advertiser_row(aid), aid)

    def rename_advertiser(self) -> bool:
        aid = self.rng.choice(list(self.advertisers))
        row = self.advertisers[aid]
        row[0] = advertiser_name(self.rng)
        row[2] = self.now_us
        self.emit("advertiser", "u", None, self._advertiser_row(aid), aid)
        return True

    def delete_advertiser(self) -> bool:
        if not self.empty_advertisers:
            return False
        aid = self.rng.choice(sorted(self.empty_advertisers))
        self.empty_advertisers.discard(aid)
        del self.advertisers[aid]
        before = {"id": aid, "name": "", "created_at": EPOCH_TEXT, "updated_at": EPOCH_TEXT}
        self.emit("advertiser", "d", before, None, aid)
        return True

    def add_campaign(self, op: str, idle: bool, backdate_us: int = 0) -> None:
        cid = self._new_id("campaign")
        advertisers = [a for a in self.advertisers if a not in self.empty_advertisers]
        created = self.now_us - backdate_us
        self.creative_versions += 1
        self.campaigns[cid] = [
            self.rng.choice(advertisers),
            campaign_name(self.rng),
            self.rng.randrange(5_000, 50_000),  # bid, 4 decimals
            self.rng.randrange(100_000, 10_000_000),  # budget, 2 decimals
            "active",
            creative_markup(self.rng, cid, self.creative_versions),
            created,
            created,
        ]
        if idle:
            self.idle_campaigns.add(cid)
        else:
            self.traffic_campaigns.append(cid)
            if backdate_us:
                self.old_campaigns.append(cid)
        self.emit("campaign", op, None, self._campaign_row(cid), cid)

    def update_campaign(self, creative: bool) -> bool:
        cid = self.rng.choice(self.traffic_campaigns)
        row = self.campaigns[cid]
        row[7] = self.now_us
        if creative:
            self.creative_versions += 1
            row[5] = creative_markup(self.rng, cid, self.creative_versions)
        else:
            what = self.rng.randrange(4)
            if what == 0:
                row[2] = self.rng.randrange(5_000, 50_000)
            elif what == 1:
                row[3] = self.rng.randrange(100_000, 10_000_000)
            elif what == 2:
                row[4] = {"active": "paused", "paused": "active", "archived": "active"}[row[4]]
            else:
                row[1] = campaign_name(self.rng)
        # REPLICA IDENTITY DEFAULT: no before-image; an untouched TOASTed creative is a placeholder.
        self.emit("campaign", "u", None, self._campaign_row(cid, toast=not creative), cid)
        return True

    def delete_campaign(self) -> bool:
        if not self.idle_campaigns:
            return False
        cid = self.rng.choice(sorted(self.idle_campaigns))
        self.idle_campaigns.discard(cid)
        del self.campaigns[cid]
        before = {
            "id": cid,
            "advertiser_id": 0,
            "name": "",
            "bid_amount": 0,
            "budget": 0,
            "status": "active",
            "creative": "",
            "created_at": EPOCH_TEXT,
            "updated_at": EPOCH_TEXT,
        }
        self.emit("campaign", "d", before, None, cid)
        return True

    # -- facts --------------------------------------------------------------------------------
    def add_impression(self) -> bool:
        rng = self.rng
        i = self._new_id("impressions")
        if self.old_campaigns and rng.random() < LATE_SHARE:
            campaign = self.old_campaigns[int(rng.random() * len(self.old_campaigns))]
            created = self.now_us - int(rng.random() * LATE_HORIZON_US)
        else:
            campaign = self.traffic_campaigns[int(rng.random() * len(self.traffic_campaigns))]
            created = self.now_us - int(rng.random() * 2_000_000)
        self.imp_campaign.append(campaign)
        self.imp_created.append(created)
        self.imp_cost.append(500 + int(rng.random() * 4_500))
        self.imp_alive.append(1)
        self.imp_clicks.append(0)
        if len(self.recent_imps) < RECENT:
            self.recent_imps.append(i)
        else:
            self.recent_imps[i % RECENT] = i
        self.emit("impressions", "c", None, self._imp_row(i), i)
        return True

    def _recent_live(self, recent: list[int], alive: bytearray, ok: Callable[[int], bool] | None = None) -> int | None:
        for _ in range(8):
            if not recent:
                return None
            i = recent[int(self.rng.random() * len(recent))]
            if alive[i - 1] and (ok is None or ok(i)):
                return i
        return None

    def update_impression(self) -> bool:
        i = self._recent_live(self.recent_imps, self.imp_alive)
        if i is None:
            return False
        before = self._imp_row(i)
        self.imp_cost[i - 1] = max(1, self.imp_cost[i - 1] * self.rng.randrange(80, 100) // 100)
        self.emit("impressions", "u", before, self._imp_row(i), i)
        return True

    def delete_impression(self) -> bool:
        i = self._recent_live(self.recent_imps, self.imp_alive, lambda i: self.imp_clicks[i - 1] == 0)
        if i is None:
            return False
        before = self._imp_row(i)
        self.imp_alive[i - 1] = 0
        self.emit("impressions", "d", before, None, i)
        return True

    def add_click(self) -> bool:
        imp = self._recent_live(self.recent_imps, self.imp_alive)
        if imp is None:
            return False
        i = self._new_id("clicks")
        self.imp_clicks[imp - 1] += 1
        self.clk_impression.append(imp)
        self.clk_campaign.append(self.imp_campaign[imp - 1])
        self.clk_created.append(self.imp_created[imp - 1] + 1_000_000 + int(self.rng.random() * 60_000_000))
        self.clk_cost.append(100_000 + int(self.rng.random() * 1_900_000))
        self.clk_alive.append(1)
        if len(self.recent_clks) < RECENT:
            self.recent_clks.append(i)
        else:
            self.recent_clks[i % RECENT] = i
        self.emit("clicks", "c", None, self._clk_row(i), i)
        return True

    def update_click(self) -> bool:
        i = self._recent_live(self.recent_clks, self.clk_alive)
        if i is None:
            return False
        before = self._clk_row(i)
        self.clk_cost[i - 1] = max(1, self.clk_cost[i - 1] * self.rng.randrange(50, 100) // 100)
        self.emit("clicks", "u", before, self._clk_row(i), i)
        return True

    def delete_click(self) -> bool:
        i = self._recent_live(self.recent_clks, self.clk_alive)
        if i is None:
            return False
        before = self._clk_row(i)
        self.clk_alive[i - 1] = 0
        self.imp_clicks[self.clk_impression[i - 1] - 1] -= 1
        self.emit("clicks", "d", before, None, i)
        return True

    # -- the run -------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """The initial snapshot (op 'r'): accounts of a platform that has been running a while."""
        week = 7 * 86_400_000_000
        for n in range(INITIAL_ADVERTISERS):
            self.add_advertiser("r", empty=n % 5 == 4, backdate_us=week)
        for n in range(INITIAL_CAMPAIGNS):
            self.add_campaign("r", idle=n % 10 == 9, backdate_us=week // 2)

    def step(self, kind: str) -> bool:
        """One change of the given kind; False when none is possible right now (nothing emitted)."""
        if kind == "impression_insert":
            return self.add_impression()
        if kind == "click_insert":
            return self.add_click()
        if kind == "impression_update":
            return self.update_impression()
        if kind == "impression_delete":
            return self.delete_impression()
        if kind == "click_update":
            return self.update_click()
        if kind == "click_delete":
            return self.delete_click()
        if kind == "campaign_update":
            return self.update_campaign(creative=False)
        if kind == "campaign_creative":
            return self.update_campaign(creative=True)
        if kind == "campaign_insert":
            self.add_campaign("c", idle=self.rng.random() < 0.3)
            return True
        if kind == "campaign_delete":
            return self.delete_campaign()
        if kind == "advertiser_insert":
            self.add_advertiser("c", empty=self.rng.random() < 0.4)
            return True
        if kind == "advertiser_rename":
            return self.rename_advertiser()
        if kind == "advertiser_delete":
            return self.delete_advertiser()
        raise ValueError(kind)

    # -- ground truth ------------------------------------------------------------------------
    def copy_lines(self, table: str):
        if table == "advertiser":
            for aid, (name, created, updated) in self.advertisers.items():
                yield f"{aid}\t{_pg_text(name)}\t{_ts(created)}\t{_ts(updated)}\n"
        elif table == "campaign":
            for cid, (adv, name, bid, budget, status, creative, created, updated) in self.campaigns.items():
                yield (
                    f"{cid}\t{adv}\t{_pg_text(name)}\t{fixed_point(bid, 4)}\t{fixed_point(budget, 2)}\t{status}\t"
                    f"{_pg_text(creative)}\t{_ts(created)}\t{_ts(updated)}\n"
                )
        elif table == "impressions":
            for j, alive in enumerate(self.imp_alive):
                if alive:
                    yield (
                        f"{j + 1}\t{self.imp_campaign[j]}\t{_ts(self.imp_created[j])}\t"
                        f"{fixed_point(self.imp_cost[j], 6)}\n"
                    )
        else:
            for j, alive in enumerate(self.clk_alive):
                if alive:
                    yield (
                        f"{j + 1}\t{self.clk_impression[j]}\t{self.clk_campaign[j]}\t"
                        f"{_ts(self.clk_created[j])}\t{fixed_point(self.clk_cost[j], 6)}\n"
                    )


def _pg_text(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# ----------------------------------------------------------------------------- producing


@dataclass
class Produced:
    prefix: str
    topics: dict[str, str]
    counts: Counts
    seconds: float
    world: World = field(repr=False)
    samples: list[tuple[str, bytes]] = field(repr=False, default_factory=list)


def create_topics(bootstrap: str, topics: list[str], partitions: int = PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    for future in futures.values():
        future.result(60)


def produce(
    bootstrap: str,
    schemas: dict[str, TableSchema],
    prefix: str,
    events: int,
    seed: int,
    source_template: dict[str, Any],
    progress: Callable[[str], None] = print,
) -> Produced:
    """Write `events` change events (plus tombstones) into the benchmark's topics."""
    create_topics(bootstrap, [s.topic for s in schemas.values()])
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"{prefix}-producer",
            "partitioner": "murmur2_random",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 512 * 1024,
        }
    )
    producer.init_transactions(60)
    producer.begin_transaction()
    counts = Counts()
    samples: list[tuple[str, bytes]] = []
    sample_kinds: set[tuple[str, str]] = set()
    headers = [
        ("__debezium.context.connectorLogicalName", prefix.encode()),
        ("__debezium.context.taskId", b"0"),
        ("__debezium.context.connectorName", b"postgresql"),
        ("__debezium.context.runId", f"{prefix}-bench".encode()),
    ]
    state = {"in_tx": 0, "lsn": 30_000_000, "txid": 1000, "tx_left": 0, "commit_us": 0, "snapshot": None}
    start_us = int(time.time() * 1e6) - 3_600_000_000
    sim_step_us = 1_000_000 // SIM_EVENTS_PER_SECOND
    source = dict(source_template)
    source.update(name=prefix, schema="public", xmin=None, origin=None, origin_lsn=None)
    encoders = {
        t: (s.topic, s.value_header, s.key_header, s.encode_value, s.encode_key, s.encode_row)
        for t, s in schemas.items()
    }
    tx_pieces: dict[str, tuple] = {}
    key_is_id = all(s.key_raw["fields"] == [{"name": "id", "type": "long"}] for s in schemas.values())
    source_head = b"".join(enc_str(source[k]) for k in ("version", "connector", "name"))
    source_db = enc_str(source["db"])
    source_schema = enc_str("public")
    # xmin, origin, origin_lsn (null), transaction (null), then op and the union tag of ts_ms.
    ops_tail = {op: b"\x00\x00\x00\x00" + enc_str(op) + b"\x02" for op in "crud"}

    def send(topic: str, key: bytes, value: bytes | None, ts_ms: int) -> None:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers, timestamp=ts_ms)
                return
            except BufferError:
                producer.poll(0.05)

    def emit(table: str, op: str, before: dict | None, after: dict | None, key_id: int) -> None:
        if state["tx_left"] <= 0:
            # A new source transaction: commit time, txId; Debezium sees it ~0.1-0.5 s later.
            state["txid"] += 1
            state["tx_left"] = 1 + int(world.rng.random() * 400)
            state["commit_us"] = world.now_us
        state["tx_left"] -= 1
        lsn_before = state["lsn"]
        state["lsn"] += 40 + int(world.rng.random() * 400)
        commit_us = state["commit_us"]
        topic, value_header, key_header, encode_value, encode_key, encode_row = encoders[table]
        snapshot = state["snapshot"] or "false"
        sequence = f'["{lsn_before}","{state["lsn"]}"]'
        lsn = state["lsn"]
        txid = state["txid"]
        # The envelope from pre-encoded pieces: the source block is constant within a transaction
        # except for `sequence` and `lsn`. Checked against the schema-compiled encoder below.
        pieces = tx_pieces.get(table)
        if pieces is None or pieces[0] != txid:
            # Debezium handles a transaction's changes together: one processing time for all.
            processed_us = max(world.now_us, commit_us) + 100_000 + int(world.rng.random() * 400_000)
            pieces = tx_pieces[table] = (
                txid,
                source_head + zz(commit_us // 1000) + b"\x00" + enc_str(snapshot) + source_db + b"\x02",
                b"\x02"
                + zz(commit_us)
                + b"\x02"
                + zz(commit_us * 1000)
                + source_schema
                + enc_str(table)
                + b"\x02"
                + zz(txid)
                + b"\x02",
                zz(processed_us // 1000) + b"\x02" + zz(processed_us) + b"\x02" + zz(processed_us * 1000 + 17),
                processed_us,
            )
        processed_us = pieces[4]
        body = b"".join(
            (
                b"\x00" if before is None else b"\x02" + encode_row(before),
                b"\x00" if after is None else b"\x02" + encode_row(after),
                pieces[1],
                enc_str(sequence),
                pieces[2],
                zz(lsn),
                ops_tail[op],
                pieces[3],
            )
        )
        if counts.events < 2000 or counts.events % 9973 == 0:
            src = source.copy()
            src.update(
                ts_ms=commit_us // 1000,
                snapshot=snapshot,
                sequence=sequence,
                ts_us=commit_us,
                ts_ns=commit_us * 1000,
                table=table,
                txId=txid,
                lsn=lsn,
            )
            envelope = {
                "before": before,
                "after": after,
                "source": src,
                "transaction": None,
                "op": op,
                "ts_ms": processed_us // 1000,
                "ts_us": processed_us,
                "ts_ns": processed_us * 1000 + 17,
            }
            if encode_value(envelope) != body or encode_key({"id": key_id}) != zz(key_id):
                raise RuntimeError(f"{table} op {op}: the fast envelope writer disagrees with the schema's encoder")
        value = value_header + body
        key = key_header + zz(key_id) if key_is_id else key_header + encode_key({"id": key_id})
        ts_ms = processed_us // 1000
        send(topic, key, value, ts_ms)
        counts.events += 1
        counts.messages += 1
        counts.bytes += len(value) + len(key)
        kind = f"{table}.{op}"
        counts.by_kind[kind] = counts.by_kind.get(kind, 0) + 1
        counts.by_table[table] = counts.by_table.get(table, 0) + 1
        if (table, op) not in sample_kinds or len(samples) < 64:
            sample_kinds.add((table, op))
            samples.append((table, value))
        if op == "d":  # tombstones.on.delete=true
            send(topic, key, None, ts_ms)
            counts.messages += 1
            counts.tombstones += 1
        state["in_tx"] += 1 + (op == "d")
        if state["in_tx"] >= MAX_TRANSACTION:
            producer.commit_transaction(60)
            producer.begin_transaction()
            state["in_tx"] = 0

    world = World(seed, start_us, emit)
    began = time.monotonic()
    state["snapshot"] = "true"
    world.snapshot()
    state["snapshot"] = None
    state["tx_left"] = 0
    kinds = [k for k, _ in MIX]
    thresholds = []
    total = 0.0
    for _, share in MIX:
        total += share
        thresholds.append(total)
    rng = world.rng
    last_report = began
    while counts.events < events:
        world.now_us += sim_step_us
        r = rng.random() * total
        index = 0
        while thresholds[index] < r:
            index += 1
        if not world.step(kinds[index]):
            world.step("impression_insert")
        now = time.monotonic()
        if now - last_report >= 5:
            last_report = now
            progress(f"  produced {counts.events:,} events ({counts.events / (now - began):,.0f}/s)")
    try:
        producer.commit_transaction(120)
    except KafkaException as exc:  # pragma: no cover - surfaced to the operator
        raise RuntimeError(f"committing the last producer transaction failed: {exc}") from exc
    producer.flush(120)
    return Produced(
        prefix,
        {t: s.topic for t, s in schemas.items()},
        counts,
        time.monotonic() - began,
        world,
        samples,
    )


# ----------------------------------------------------------------------------- ground truth in Postgres


def write_ground_truth(dsn: str, schema: str, world: World) -> dict[str, int]:
    """The final rows of the simulated database, in a Postgres schema of their own with the
    shape of postgres/schema.sql (verify reads the tables through `search_path`)."""
    rows = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{schema}"')
        for table in TABLES:
            conn.execute(f'CREATE TABLE "{schema}".{table} (LIKE public.{table} INCLUDING DEFAULTS)')
            # Only the columns of postgres/schema.sql (tests may have added some to the stack's).
            extra = conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
                (schema, table),
            ).fetchall()
            for (column,) in extra:
                if column not in COLUMNS[table]:
                    conn.execute(f'ALTER TABLE "{schema}".{table} DROP COLUMN "{column}"')
            n = 0
            with conn.cursor() as cur, cur.copy(f'COPY "{schema}".{table} FROM STDIN') as copy:
                chunk: list[str] = []
                for line in world.copy_lines(table):
                    chunk.append(line)
                    n += 1
                    if len(chunk) >= 20_000:
                        copy.write("".join(chunk))
                        chunk.clear()
                if chunk:
                    copy.write("".join(chunk))
            conn.execute(f'ALTER TABLE "{schema}".{table} ADD PRIMARY KEY (id)')
            rows[table] = n
        conn.execute(f'ANALYZE "{schema}".impressions')
    return rows


def drop_ground_truth(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def ground_truth_dsn(dsn: str, schema: str) -> str:
    separator = "&" if "?" in dsn else "?"
    return f"{dsn}{separator}options=-csearch_path%3D{schema}"


__all__ = [
    "CREATIVE_MAX_CHARS",
    "CREATIVE_MIN_CHARS",
    "CompatReport",
    "Produced",
    "TableSchema",
    "World",
    "bench_schemas",
    "check_against_fastavro",
    "check_against_real",
    "ground_truth_dsn",
    "murmur2_partition",
    "produce",
    "template_schemas",
    "write_ground_truth",
]
