"""Hostile input in the LIVE change topics while real traffic flows (issue 14's "done when").

Every kind of tests/hostile_messages.py (SQL in column names, ops that are no strings, 100,000-deep
JSON, decimal scales of 10^12, a writer schema 300 records deep in the registry, a new column of
39 decimal places, more new columns than CDC_MAX_EVOLVED_COLUMNS, values beyond Int64, DateTime64
and Decimal(12, 6), a lone surrogate, LSNs outside [0, 2^64), an unknown schema id, a message a few
KB under the broker's 10 MiB) is produced into adtech.public.advertiser / .impressions, twice
over, among the generator's changes. The consumer reads the registry through a URL with a
password planted in it. Then:

* the consumer process never exited;
* every hostile message is in the DLQ, at its partition and offset, with its precise class;
* no ClickHouse table's columns changed, no row of a hostile message's id exists, and every KPI
  and dimension equals Postgres (cdc_dev.verify, as every fault scenario ends);
* the consumer's RSS after the hostile messages is within HOSTILE_RSS_GROWTH of what it was
  under the same traffic before them;
* the planted password is in none of the consumer's output, the DLQ records or /metrics.

It runs LAST in the fault suite (tests/faults/conftest.py): the hostile messages stay in the live
topics, so any later consumer of them, in this session or a later one on the same stack, reads
them again (and dead-letters them). Bring a stack up afresh after it when that matters.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from confluent_kafka import Producer

from tests.consumer_helpers import new_target, running_consumer
from tests.debezium_helpers import drain
from tests.faults.helpers import (
    BAD_INPUT,
    Result,
    Traffic,
    free_port,
    scaled,
    settle_and_check,
    wait_port,
    warm_up,
)
from tests.hostile_messages import FRESH_IDS_FROM, catalogue, real_messages

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.faults]

PLANTED = "S3cretPlanted"
MAX_EVOLVED_COLUMNS = 5
# Allowed RSS growth from traffic alone to the end: two hostile messages of nearly 10 MiB each pass
# through librdkafka's fetch buffers, a Python copy, the decoder and the DLQ producer's buffer.
HOSTILE_RSS_GROWTH = 64 * 2**20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def planted_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"planted:{PLANTED}@{parts.netloc}"))


def register(registry_url: str, subject: str):
    def put(schema: str) -> int:
        response = requests.post(f"{registry_url}/subjects/{subject}/versions", json={"schema": schema}, timeout=60)
        assert response.status_code < 300, response.text[:500]
        return response.json()["id"]

    return put


def test_hostile_messages_in_the_live_topics_cost_one_dead_letter_each(stack, tmp_path) -> None:
    rounds = scaled(2, 5)
    fresh_ids = itertools.count(FRESH_IDS_FROM + uuid.uuid4().int % 10**9 * 1_000)
    subject = f"hostile-{uuid.uuid4().hex[:8]}-value"
    hostile = [
        message
        for _ in range(rounds)
        for message in catalogue(
            real_messages(),
            fresh_ids,
            register(stack.schema_registry_url, subject),
            max_evolved_columns=MAX_EVOLVED_COLUMNS,
            unknown_schema_id=2_000_000_000 + int(uuid.uuid4().int % 10**6),
        )
    ]
    assert len(hostile) >= 20 and len({h.kind for h in hostile}) >= 12

    Traffic(stack.postgres_dsn, seed=14013, duration=3).start().wait()  # every change topic has history
    port = free_port()
    target = new_target(
        stack,
        tmp_path,
        CDC_METRICS_PORT=str(port),
        CDC_SCHEMA_REGISTRY_URL=planted_url(stack.schema_registry_url),
        CDC_MAX_EVOLVED_COLUMNS=str(MAX_EVOLVED_COLUMNS),
    )
    with running_consumer(target, tmp_path) as consumer:
        wait_port(port)
        warm_up(stack, target, consumer)
        ch = target.clickhouse()
        columns_before = table_columns(ch)

        with Traffic(stack.postgres_dsn, seed=14014) as traffic:
            time.sleep(3)
            rss_before = rss(consumer.proc.pid)  # under traffic, before the first hostile message
            produced = produce(stack.kafka_bootstrap, hostile)
            time.sleep(scaled(5, 20))
        result = Result(
            f"hostile input: {len(hostile)} messages of {len({h.kind for h in hostile})} kinds in the live topics",
            traffic.events + len(hostile),
            dead_lettered=len(hostile),
            note="each dead-lettered with its class; columns unchanged; planted registry password nowhere",
        )
        settle_and_check(stack, target, result, process=consumer)
        dead = drain(stack.kafka_bootstrap, [target.env["CDC_DLQ_TOPIC"]], idle_seconds=3)
        result.dead_lettered = len(dead)
        metrics_text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        rss_after = rss(consumer.proc.pid)
        assert consumer.proc.poll() is None, f"the consumer exited:\n{consumer.output()[-5000:]}"

        by_place = {}
        for m in dead:
            headers = {k: v.decode(errors="replace") for k, v in (m.headers or [])}
            place = (
                headers["cdc.source.topic"],
                int(headers["cdc.source.partition"]),
                int(headers["cdc.source.offset"]),
            )
            by_place[place] = headers
            # Nothing else: a fresh consumer reads the whole topics, hostile messages an earlier
            # run of this scenario left in them included (keyed like these).
            assert place in produced or (m.key or b"").startswith(b"hostile-"), (place, headers)
        assert set(produced) <= set(by_place), "every hostile message is in the DLQ"
        for place, message in produced.items():
            headers = by_place[place]
            assert headers["cdc.error.class"] == message.error_class, (message.kind, headers["cdc.error.message"])
            BAD_INPUT.append((message.kind, f"DLQ `{message.error_class}`", headers["cdc.error.message"]))

        assert table_columns(ch) == columns_before, "no column added, changed or dropped"
        for table in ("dim_advertiser", "fact_impressions"):
            (rows,) = ch.query(f"SELECT count() FROM {table} WHERE id >= {FRESH_IDS_FROM}").result_rows[0]
            assert rows == 0, f"{table}: rows of hostile messages"
        assert rss_after - rss_before < HOSTILE_RSS_GROWTH, (rss_before, rss_after)

        said = {
            "consumer output": consumer.output(),
            "DLQ records": "".join(
                repr(m.value) + json.dumps([(k, v.decode(errors="replace")) for k, v in m.headers or []]) for m in dead
            ),
            "metrics": metrics_text,
        }
        for where, text in said.items():
            assert PLANTED not in text, f"the planted registry password is in the {where}"
    result.note += f"; RSS {rss_before / 2**20:.0f} → {rss_after / 2**20:.0f} MiB"


def table_columns(ch) -> list[tuple]:
    return ch.query(
        "SELECT table, name, type FROM system.columns WHERE database = currentDatabase() ORDER BY table, position"
    ).result_rows


def produce(bootstrap: str, hostile: list) -> dict[tuple[str, int, int], object]:
    """Each message into its table's live topic; (topic, partition, offset) → the message."""
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 10 * 2**20, "linger.ms": 5})
    placed: dict[tuple[str, int, int], object] = {}
    errors = []

    def delivered(message):
        def callback(error, record) -> None:
            if error is not None:
                errors.append((message.kind, error))
            else:
                placed[(record.topic(), record.partition(), record.offset())] = message

        return callback

    for n, message in enumerate(hostile):
        topic = f"adtech.public.{message.table}"
        producer.produce(topic, key=f"hostile-{n}".encode(), value=message.value, on_delivery=delivered(message))
        producer.poll(0)
    assert producer.flush(60) == 0 and not errors, errors
    return placed
