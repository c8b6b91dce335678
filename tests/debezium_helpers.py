"""Test helpers: a throwaway Debezium connector and reading its topics back from Kafka."""

from __future__ import annotations

import io
import json
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fastavro
import psycopg
import requests
from confluent_kafka import Consumer, KafkaError

from cdc_dev.stack.layout import REPO_ROOT

SOURCE_TABLES = ("advertiser", "campaign", "impressions", "clicks")


@dataclass
class RawMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None


@contextmanager
def throwaway_connector(
    connect_url: str, postgres_dsn: str, variant: str = "avro", prefix: str | None = None, **overrides: str
) -> Iterator[str]:
    """Register a copy of the shipped connector config under a fresh topic prefix, slot and
    publication, so the test sees its own snapshot and stream; yields the topic prefix."""
    name = f"t{uuid.uuid4().hex[:10]}"  # of the connector, its slot and its publication
    topic_prefix = prefix or name
    name_file = "debezium-postgres.json" if variant == "avro" else "debezium-postgres-json.json"
    spec = json.loads((REPO_ROOT / "connectors" / name_file).read_text())
    config = {**spec["config"], "topic.prefix": topic_prefix, "slot.name": name, "publication.name": name, **overrides}
    response = requests.put(f"{connect_url}/connectors/{name}/config", json=config, timeout=30)
    assert response.status_code < 400, response.text
    try:
        wait_connector_running(connect_url, name)
        yield topic_prefix
    finally:
        requests.delete(f"{connect_url}/connectors/{name}", timeout=30)
        _drop_slot_and_publication(postgres_dsn, name)


def wait_connector_running(connect_url: str, name: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        try:
            state = requests.get(f"{connect_url}/connectors/{name}/status", timeout=10).json()
        except requests.RequestException:
            time.sleep(1)
            continue
        tasks = state.get("tasks", [])
        if any(t.get("state") == "FAILED" for t in tasks):
            raise AssertionError(f"connector task failed: {json.dumps(state)[:3000]}")
        if (
            state.get("connector", {}).get("state") == "RUNNING"
            and tasks
            and all(t["state"] == "RUNNING" for t in tasks)
        ):
            return state
        time.sleep(1)
    raise AssertionError(f"connector {name} not running: {state}")


def _drop_slot_and_publication(postgres_dsn: str, name: str) -> None:
    deadline = time.monotonic() + 60
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
            if row is None:
                break
            if not row[0]:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                break
            time.sleep(1)
        conn.execute(f'DROP PUBLICATION IF EXISTS "{name}"')


def kafka_properties(kafka: str | Mapping[str, str], **own: object) -> dict[str, object]:
    """A client's librdkafka properties: a bare bootstrap string (a plain cluster) or a stack's
    shared properties (`stack.kafka`: credentials and CA of the secured stack), plus `own`."""
    shared = {"bootstrap.servers": kafka} if isinstance(kafka, str) else dict(kafka)
    return {**shared, **own}


def drain(
    kafka: str | Mapping[str, str],
    topics: list[str],
    *,
    idle_seconds: float = 5.0,
    timeout: float = 180.0,
    until: Callable[[list[RawMessage]], bool] | None = None,
) -> list[RawMessage]:
    """Read the topics from the beginning (committed transactions only) until nothing new
    arrived for `idle_seconds` and `until(messages)` (if given) holds."""
    consumer = Consumer(
        kafka_properties(
            kafka,
            **{
                "group.id": f"test-drain-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "topic.metadata.refresh.interval.ms": 1000,
            },
        )
    )
    consumer.subscribe(topics)
    messages: list[RawMessage] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, timeout=0.5)
            for msg in batch:
                if msg.error():
                    if msg.error().code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                        continue
                    raise AssertionError(f"Kafka error: {msg.error()}")
                messages.append(
                    RawMessage(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.headers())
                )
            if batch:
                last_new = time.monotonic()
            elif time.monotonic() - last_new >= idle_seconds and (until is None or until(messages)):
                return messages
        raise AssertionError(f"topics {topics} did not settle within {timeout}s ({len(messages)} messages)")
    finally:
        consumer.close()


class AvroReader:
    """Decodes Confluent-framed Avro with schemas fetched from the registry: a deliberately
    independent, minimal reader, so stack tests do not depend on the consumer's decoder."""

    def __init__(self, registry_url: str, ca: str | None = None):
        self.registry_url = registry_url
        self.verify = ca or True
        self.schemas: dict[int, dict] = {}
        self.raw_schemas: dict[int, str] = {}

    def schema(self, schema_id: int) -> dict:
        if schema_id not in self.schemas:
            response = requests.get(f"{self.registry_url}/schemas/ids/{schema_id}", timeout=10, verify=self.verify)
            response.raise_for_status()
            self.raw_schemas[schema_id] = response.json()["schema"]
            self.schemas[schema_id] = fastavro.parse_schema(json.loads(self.raw_schemas[schema_id]))
        return self.schemas[schema_id]

    def decode(self, data: bytes | None) -> dict | None:
        if data is None:
            return None
        magic, schema_id = struct.unpack(">bI", data[:5])
        assert magic == 0, f"not Confluent wire format: magic byte {magic}"
        return fastavro.schemaless_reader(io.BytesIO(data[5:]), self.schema(schema_id))


def save_fixture(directory: Path, name: str, message: RawMessage, reader: AvroReader | None) -> None:
    """Keep a real envelope (bytes, and the writer schema for Avro) for unit tests."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "value_hex": message.value.hex() if message.value is not None else None,
    }
    if reader is not None and message.value is not None:
        schema_id = struct.unpack(">I", message.value[1:5])[0]
        reader.schema(schema_id)
        record["schema_id"] = schema_id
        record["schema"] = json.loads(reader.raw_schemas[schema_id])
    (directory / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
