"""Bad input between good messages, in real topics.

The whole history of the four change topics is copied, partition by partition and in order, into
topics of a fresh prefix, with bad messages produced between the good ones. A consumer on that
prefix must dead-letter each bad message with a precise reason (or behave as documented below),
count it in `cdc_dlq_messages_total`, and apply every good message: so ClickHouse must equal
Postgres exactly, as for the real topics.

Documented behaviours (not dead-lettered):

* **null key** with a valid value: applied. The consumer reads the row (key included) from the
  value; the Kafka key only decides the partition.
* **null key and null value** (a tombstone without key): skipped, like every tombstone.
* **a 5 MB message**: size is no error. A valid 5 MB change (a campaign with a 5 MB creative) is
  applied; a 5 MB message that does not decode is dead-lettered whole, byte for byte (the stack's
  broker and the DLQ producer allow 10 MiB).
* **a topic missing from the mapping**: never read. The consumer subscribes to the mapped topics
  only, so a topic Debezium writes for an unmapped table (here `<prefix>.public.cdc_heartbeat`) is
  neither applied nor dead-lettered, and the group commits no offset for it: the mapping decides.
* **the schema registry unreachable**: not poison, the partition pauses and retries
  (tests/faults/test_stack_faults.py, test_schema_registry_unreachable_…).
"""

from __future__ import annotations

import copy
import io
import json
import struct
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import fastavro
import pytest
import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.consumer_helpers import new_target, running_consumer, wait_caught_up
from tests.debezium_helpers import SOURCE_TABLES, AvroReader, drain
from tests.faults.helpers import (
    BAD_INPUT,
    PROBE_ID,
    Probe,
    Result,
    Traffic,
    committed_offsets,
    free_port,
    metric_sum,
    scrape,
    settle_and_check,
    wait_port,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.faults]

MB = 1_000_000
PLACEHOLDER = "__debezium_unavailable_value"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Avro:
    """Re-encodes decoded Debezium records: with their own writer schema, or with a variant
    registered under a subject of the test's own."""

    def __init__(self, registry_url: str):
        self.url = registry_url
        self.reader = AvroReader(registry_url)

    def decode(self, value: bytes) -> tuple[int, dict]:
        schema_id = struct.unpack(">I", value[1:5])[0]
        return schema_id, self.reader.decode(value)

    def encode(self, schema_id: int, record: dict) -> bytes:
        out = io.BytesIO()
        out.write(b"\x00" + struct.pack(">I", schema_id))
        fastavro.schemaless_writer(out, self.reader.schema(schema_id), record)
        return out.getvalue()

    def register(self, subject: str, schema: dict) -> int:
        response = requests.post(
            f"{self.url}/subjects/{subject}/versions", json={"schema": json.dumps(schema)}, timeout=30
        )
        assert response.status_code < 300, response.text
        return response.json()["id"]

    def raw_schema(self, schema_id: int) -> dict:
        self.reader.schema(schema_id)
        return json.loads(self.reader.raw_schemas[schema_id])


def _with_cost_scale(schema: dict, scale: int) -> dict:
    """The impressions envelope schema with `cost` declared at another scale."""
    schema = copy.deepcopy(schema)
    value = next(t for t in schema["fields"][0]["type"] if isinstance(t, dict))  # before: [null, Value]
    cost = next(f for f in value["fields"] if f["name"] == "cost")
    cost["type"]["scale"] = scale
    cost["type"]["connect.parameters"]["scale"] = str(scale)
    return schema


def _history(stack, avro: Avro) -> list:
    """Every message of the four change topics, once Debezium emitted everything Postgres holds
    (a probe change committed last has arrived)."""
    micros = Probe(stack.postgres_dsn).touch()
    topic = "adtech.public.advertiser"

    def probe_arrived(messages) -> bool:
        for m in reversed(messages):
            if m.topic == topic and m.value:
                after = avro.decode(m.value)[1]["after"]
                if after and after["id"] == PROBE_ID and _micros(after["updated_at"]) >= micros:
                    return True
        return False

    return drain(
        stack.kafka_bootstrap,
        [f"adtech.public.{t}" for t in SOURCE_TABLES],
        idle_seconds=2,
        until=probe_arrived,
        timeout=600,
    )


def _micros(zoned: str) -> int:
    moment = datetime.fromisoformat(zoned.replace("Z", "+00:00"))
    return (moment - EPOCH) // timedelta(microseconds=1)


def test_bad_input_is_dead_lettered_with_its_reason_and_good_messages_around_it_are_applied(stack, tmp_path) -> None:
    Traffic(stack.postgres_dsn, seed=6001, duration=3).start().wait()  # every table has history
    avro = Avro(stack.schema_registry_url)
    history = _history(stack, avro)
    prefix = f"poison{uuid.uuid4().hex[:8]}"
    partitions: dict[tuple[str, int], list] = defaultdict(list)
    for m in history:
        partitions[(m.topic.replace("adtech.", f"{prefix}.", 1), m.partition)].append([m.key, m.value, None])

    def real(table: str, where) -> tuple:
        for m in history:
            if m.topic == f"adtech.public.{table}" and m.value:
                schema_id, record = avro.decode(m.value)
                if where(record):
                    return m, schema_id, record
        raise AssertionError(f"no {table} message as needed in the history")

    impression, imp_schema, imp_record = real("impressions", lambda r: r["op"] in ("c", "r"))
    click, _, _ = real("clicks", lambda r: r["op"] in ("c", "r"))
    campaign, camp_schema, camp_record = real(
        "campaign", lambda r: r["op"] in ("c", "r", "u") and r["after"]["creative"] != PLACEHOLDER
    )

    fresh_ids = iter(range(-(10**12), -(10**12) - 100, -1))  # ids Postgres never had

    def impression_with(**after) -> bytes:
        record = copy.deepcopy(imp_record)
        record["after"].update(id=next(fresh_ids), **after)
        return avro.encode(imp_schema, record)

    scale_8 = _with_cost_scale(avro.raw_schema(imp_schema), 8)
    scale_8_id = avro.register(f"{prefix}.public.impressions-value", scale_8)
    wide = copy.deepcopy(imp_record)
    wide["after"].update(id=next(fresh_ids), cost=Decimal("0.12345678"))
    wide_cost = io.BytesIO()
    wide_cost.write(b"\x00" + struct.pack(">I", scale_8_id))
    fastavro.schemaless_writer(wide_cost, fastavro.parse_schema(scale_8), wide)
    body = impression.value[5:]
    garbage_5mb = b'{"op": "c", "after": {"creative": "' + b"x" * (5 * MB)  # never closed

    # kind -> (value, expected error class, words the reason must contain)
    poison = {
        "wrong magic byte": (b"\x07" + impression.value[1:], "wrong_magic_byte", ["0x07"]),
        "unknown schema id": (b"\x00" + struct.pack(">I", 2_000_000_077) + body, "unknown_schema_id", ["2000000077"]),
        "truncated Avro": (impression.value[: len(impression.value) // 2], "truncated_avro", ["ended early"]),
        "Avro of another table's schema": (click.value, "table_mismatch", ["clicks", f"{prefix}.public.impressions"]),
        "invalid JSON": (b'{"op": "c", "after": {"id": 1,', "invalid_json", ["invalid JSON"]),
        "JSON without op": (
            b'{"before": null, "after": {"id": 1}, "source": {"table": "impressions"}}',
            "missing_op",
            ["no 'op'"],
        ),
        "empty value (0 bytes)": (b"", "empty_value", ["0 bytes"]),
        "5 MB that does not decode": (garbage_5mb, "invalid_json", ["invalid JSON"]),
        "decimal of scale 8 (Avro)": (
            wide_cost.getvalue(),
            "decimal_scale_exceeded",
            ["cost", "more than 6 decimal places"],
        ),
        "decimal of scale 8 (JSON)": (
            json.dumps(
                {
                    "op": "c",
                    "before": None,
                    "source": {"table": "impressions", "lsn": 1, "ts_ms": 1},
                    "after": {
                        "id": next(fresh_ids),
                        "campaign_id": 1,
                        "created_at": "2026-01-01T00:00:00Z",
                        "cost": 0.12345678,
                    },
                }
            ).encode(),
            "decimal_scale_exceeded",
            ["cost", "more than 6 decimal places"],
        ),
        "timestamp after ClickHouse's range": (
            impression_with(created_at="2300-01-01T00:00:00Z"),
            "datetime_out_of_range",
            ["created_at", "2300-01-01"],
        ),
        "timestamp before ClickHouse's range": (
            impression_with(created_at="1899-12-31T23:59:59Z"),
            "datetime_out_of_range",
            ["created_at", "1899-12-31"],
        ),
    }
    # Spread between the good messages of one impressions partition.
    target_partition = (f"{prefix}.public.impressions", impression.partition)
    good = partitions[target_partition]
    step = max(1, len(good) // (len(poison) + 1))
    expected: dict[int, tuple[str, str, list[str], bytes]] = {}
    out: list = []
    kinds = list(poison.items())
    for i, message in enumerate(good):
        out.append(message)
        if i % step == step - 1 and kinds:
            kind, (value, error_class, words) = kinds.pop(0)
            expected[len(out)] = (kind, error_class, words, value)
            out.append([b"poison", value, [("expect", error_class.encode())]])
    # Null key, valid value: a real message without its key (applied); a keyless tombstone (skipped).
    keyless_at = next(i for i, (_k, v, _h) in enumerate(out) if v and i not in expected and v[0] == 0)
    out[keyless_at][0] = None
    out.insert(keyless_at + 1, [None, None, None])
    expected = {(o + 1 if o > keyless_at else o): e for o, e in expected.items()}
    partitions[target_partition] = out
    # A valid 5 MB change: the campaign with a 5 MB creative, then its real message again (so the
    # final state is Postgres'), right after the real message in its partition.
    camp_partition = (f"{prefix}.public.campaign", campaign.partition)
    at = next(i for i, m in enumerate(partitions[camp_partition]) if m[1] == campaign.value)
    big = copy.deepcopy(camp_record)
    big["after"]["creative"] = "<div>" + "y" * (5 * MB - 11) + "</div>"
    partitions[camp_partition][at + 1 : at + 1] = [[campaign.key, avro.encode(camp_schema, big), None]]
    partitions[camp_partition].insert(at + 2, [campaign.key, campaign.value, None])
    # A topic the mapping does not name: a valid impression in <prefix>.public.cdc_heartbeat.
    unmapped = f"{prefix}.public.cdc_heartbeat"
    partitions[(unmapped, 0)] = [[impression.key, impression.value, None]]

    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    topics = sorted({t for t, _ in partitions})
    count = {t: 1 + max(p for tt, p in partitions if tt == t) for t in topics}
    futures = admin.create_topics(
        [NewTopic(t, count[t], 1, config={"max.message.bytes": str(8 * 2**20)}) for t in topics]
    )
    for future in futures.values():
        future.result(30)
    producer = Producer(
        {
            "bootstrap.servers": stack.kafka_bootstrap,
            "enable.idempotence": True,
            "linger.ms": 20,
            "message.max.bytes": 10 * 2**20,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    total = 0
    for (topic, partition), messages in partitions.items():
        for key, value, headers in messages:
            while True:
                try:
                    producer.produce(topic, key=key, value=value, partition=partition, headers=headers)
                    break
                except BufferError:
                    producer.poll(0.1)
            total += 1
        producer.poll(0)
    assert producer.flush(120) == 0

    port = free_port()
    target = new_target(stack, tmp_path, topic_prefix=prefix, CDC_METRICS_PORT=str(port))
    with running_consumer(target, tmp_path) as consumer:
        wait_port(port)
        wait_caught_up(stack, target, consumer, timeout=600)
        dead = drain(stack.kafka_bootstrap, [target.env["CDC_DLQ_TOPIC"]], idle_seconds=2)
        samples = scrape(port)
        result = Result(
            f"bad input: {len(poison)} kinds among good messages",
            total,
            dead_lettered=len(dead),
            note="events = Kafka messages copied + bad ones; each bad one dead-lettered with its reason (table below)",
        )
        outcome = settle_and_check(stack, target, result, process=consumer, probe=False)

    # The audit counts each of them as accounted for (dead-lettered), not as a gap.
    assert sum(p["accounted"]["dead_lettered"] for p in outcome.audit["partitions"]) == len(dead)

    # Every bad message in the DLQ, at its offset, with its reason; nothing else.
    impressions_topic = target_partition[0]
    by_offset = {}
    for m in dead:
        headers = {k: v.decode() for k, v in (m.headers or []) if k.startswith("cdc.")}
        assert headers["cdc.source.topic"] == impressions_topic, headers
        assert int(headers["cdc.source.partition"]) == target_partition[1]
        by_offset[int(headers["cdc.source.offset"])] = (headers, m.value)
    assert sorted(by_offset) == sorted(expected), (sorted(by_offset), sorted(expected))
    for offset, (kind, error_class, words, value) in expected.items():
        headers, dead_value = by_offset[offset]
        assert headers["cdc.error.class"] == error_class, (kind, headers)
        reason = headers["cdc.error.message"]
        assert all(w in reason for w in words), (kind, reason)
        assert (dead_value or b"") == value, f"{kind}: the DLQ keeps the message byte for byte"
        BAD_INPUT.append((kind, f"DLQ `{error_class}`", reason))
    # Counted in the metrics, per class.
    classes = Counter(error_class for _, error_class, _, _ in expected.values())
    for error_class, n in classes.items():
        assert metric_sum(samples, "cdc_dlq_messages_total", error_class=error_class) == n, error_class
    assert metric_sum(samples, "cdc_dlq_messages_total") == len(expected)

    ch = target.clickhouse()
    (applied,) = ch.query(
        "SELECT count() FROM fact_impressions WHERE _topic = {t:String} AND _partition = {p:UInt16} "
        "AND _offset = {o:UInt64}",
        parameters={"t": impressions_topic, "p": target_partition[1], "o": keyless_at},
    ).result_rows[0]
    assert applied >= 1, "the message without a key is applied"
    # The 5 MB version is superseded at once (ReplacingMergeTree may already have merged it away),
    # so the proof is the consumer's count: one dim_campaign row per campaign change, that one included.
    campaign_changes = sum(1 for (t, _), ms in partitions.items() if t == camp_partition[0] for m in ms if m[1])
    assert metric_sum(samples, "cdc_rows_inserted_total", table="dim_campaign") == campaign_changes
    read = metric_sum(samples, "cdc_bytes_consumed_total", topic=camp_partition[0], partition=str(camp_partition[1]))
    assert read > 5 * MB
    assert committed_offsets(stack.kafka_bootstrap, target.group_id, [unmapped]) == {(unmapped, 0): None}
    BAD_INPUT.extend(
        [
            ("null key, valid value", "applied", "the row comes from the value; the key only chose the partition"),
            ("null key, null value", "skipped", "a tombstone: nothing to apply, offset committed"),
            (
                "valid 5 MB change (campaign, 5 MB creative)",
                "applied",
                "size is no error (broker and DLQ allow 10 MiB)",
            ),
            (
                f"topic missing from the mapping ({unmapped})",
                "never read",
                "subscribed: mapped topics only; no offset committed",
            ),
            (
                "schema registry unreachable",
                "paused, retried",
                "not poison: /readyz 503, applied once it is back (test_stack_faults)",
            ),
        ]
    )
