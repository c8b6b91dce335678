"""Test helpers: the consumer as a real process, and 'caught up' read from Kafka itself."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import requests
from confluent_kafka import Consumer, TopicPartition

from cdc_dev.stack.process import terminate
from consumer.kafka.client_config import KafkaClientConfig
from consumer.kafka.lag import LagReader
from consumer.transform.mapping import load_mapping
from tests.debezium_helpers import AvroReader, kafka_properties


@dataclass
class ConsumerProcess:
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 60) -> int:
        return terminate(self.proc, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class ConsumerTarget:
    """What one test's consumers share: a group, a ClickHouse database, a topic prefix."""

    group_id: str
    database: str
    env: dict[str, str]
    stack: Any  # conftest.StackEndpoints

    def clickhouse(self):
        return self.stack.clickhouse(self.database)


def new_target(stack, tmp_path: Path, topic_prefix: str = "adtech", **settings: str) -> ConsumerTarget:
    run_id = uuid.uuid4().hex[:8]
    database = f"test_{run_id}"
    env = {
        **os.environ,
        **stack.env(),
        "CDC_CLICKHOUSE_URL": f"{stack.clickhouse_url}/{database}",
        "CDC_GROUP_ID": f"test-{run_id}",
        "CDC_TOPIC_PREFIX": topic_prefix,
        "CDC_DLQ_TOPIC": f"test-{run_id}.dlq",
        "CDC_METRICS_PORT": "0",
        "CDC_BATCH_MAX_AGE_S": "0.5",
        **settings,
    }
    return ConsumerTarget(env["CDC_GROUP_ID"], database, env, stack)


@contextmanager
def running_consumer(target: ConsumerTarget, tmp_path: Path, **extra_env: str) -> Iterator[ConsumerProcess]:
    process = start_consumer(target, tmp_path, **extra_env)
    try:
        yield process
    finally:
        process.stop()


def start_consumer(target: ConsumerTarget, tmp_path: Path, **extra_env: str) -> ConsumerProcess:
    log = tmp_path / f"consumer-{uuid.uuid4().hex[:6]}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "run"],
            env={**target.env, **extra_env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ConsumerProcess(proc, log)


def group_lag(kafka: str | Mapping[str, str], group_id: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """Per partition: the last stable offset minus the group's committed offset (what a
    read_committed consumer still has to read)."""
    probe = Consumer(
        kafka_properties(
            kafka,
            **{
                "group.id": group_id,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    try:
        metadata = probe.list_topics(timeout=10)
        partitions = [
            TopicPartition(t, p) for t in topics if t in metadata.topics for p in metadata.topics[t].partitions
        ]
        committed = {(tp.topic, tp.partition): tp.offset for tp in probe.committed(partitions, timeout=10)}
        lag = {}
        for tp in partitions:
            _low, high = probe.get_watermark_offsets(tp, timeout=10)
            done = max(committed[(tp.topic, tp.partition)], 0)
            lag[(tp.topic, tp.partition)] = max(high - done, 0)
        return lag
    finally:
        probe.close()


def topics_for(prefix: str) -> list[str]:
    return load_mapping(topic_prefix=prefix).topics


def wait_delivered(stack, topic_prefix: str, timeout: float = 120) -> None:
    """Until Debezium has emitted every change committed in Postgres so far: a marker row in
    `cdc_heartbeat` (captured, never compared) committed now is readable in Kafka, and Debezium
    emits in commit order. Without it "caught up" can mean caught up with a Debezium that is
    still up to a poll interval behind Postgres."""
    if not _connector_streams(stack.connect_url, topic_prefix):
        return  # no Debezium writes these topics now: a test's own messages, or a finished snapshot
    topic = f"{topic_prefix}.public.cdc_heartbeat"
    start = {p: offset for (_, p), offset in end_offsets(stack.kafka, [topic]).items()}
    marker = random.randint(1_000_000, 2**31 - 1)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO cdc_heartbeat (id, beat_at) VALUES (%s, now())", (marker,))
        try:
            _wait_marker(stack, topic, start, marker, timeout)
        finally:
            conn.execute("DELETE FROM cdc_heartbeat WHERE id = %s", (marker,))


def _connector_streams(connect_url: str, topic_prefix: str) -> bool:  # Connect's REST API is plain HTTP in both modes
    connectors = requests.get(f"{connect_url}/connectors?expand=info&expand=status", timeout=30).json()
    return any(
        c["info"]["config"].get("topic.prefix") == topic_prefix
        and c["info"]["config"].get("snapshot.mode") != "initial_only"
        and c["status"]["connector"]["state"] == "RUNNING"
        for c in connectors.values()
    )


def _wait_marker(stack, topic: str, start: dict[int, int], marker: int, timeout: float) -> None:
    reader = Consumer(
        kafka_properties(
            stack.kafka,
            **{
                "group.id": f"marker-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    avro = AvroReader(stack.schema_registry_url, ca=stack.ca)
    reader.assign([TopicPartition(topic, p, o) for p, o in start.items()])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for message in reader.consume(500, timeout=0.5):
                value = message.value() if message.error() is None else None
                if not value:
                    continue
                change = avro.decode(value) if value[:1] == b"\x00" else json.loads(value)
                change = change.get("payload", change)  # JSON with or without the schema envelope
                if (change.get("after") or {}).get("id") == marker:
                    return
    finally:
        reader.close()
    raise AssertionError(f"Debezium did not emit the marker {marker} to {topic} within {timeout}s")


def end_offsets(kafka: str | Mapping[str, str], topics: list[str]) -> dict[tuple[str, int], int]:
    """(topic, partition) -> high watermark (an unknown topic has no partitions)."""
    from confluent_kafka.admin import OffsetSpec

    reader = LagReader(KafkaClientConfig(kafka_properties(kafka)), "test-probe")
    try:
        return reader.offsets(reader.partitions(topics), OffsetSpec.latest())
    finally:
        reader.close()


def run_audit(target: ConsumerTarget, *args: str) -> tuple[int, dict]:
    """`cdc-consumer audit --json` for the target's group and database, as an operator runs it:
    (exit code, the report)."""
    done = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "audit", "--json", *args],
        env=target.env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.stdout.lstrip().startswith("{"), f"audit exited {done.returncode}:\n{done.stderr[-5000:]}"
    return done.returncode, json.loads(done.stdout)


def audit_issues(report: dict) -> list[tuple[str, int, str, int]]:
    """(topic, partition, kind, offset) of every issue the audit listed."""
    return [(p["topic"], p["partition"], i["kind"], i["offset"]) for p in report["partitions"] for i in p["issues"]]


def wait_caught_up(stack, target: ConsumerTarget, process: ConsumerProcess | None = None, timeout: float = 300) -> None:
    """Until Debezium has emitted everything committed so far, and every partition's committed
    offset reached the end of its topic."""
    topics = topics_for(target.env["CDC_TOPIC_PREFIX"])
    wait_delivered(stack, target.env["CDC_TOPIC_PREFIX"], timeout=min(timeout, 120))
    deadline = time.monotonic() + timeout
    lag: dict = {}
    while time.monotonic() < deadline:
        if process is not None and process.proc.poll() is not None:
            raise AssertionError(f"consumer exited with {process.proc.returncode}:\n{process.output()[-5000:]}")
        lag = group_lag(stack.kafka, target.group_id, topics)
        if lag and all(v == 0 for v in lag.values()):
            return
        time.sleep(1)
    tail = process.output()[-5000:] if process else ""
    raise AssertionError(f"not caught up after {timeout}s: { {k: v for k, v in lag.items() if v} }\n{tail}")
