"""The native stack for real: lifecycle, Debezium events in Kafka, Connect restarts."""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from cdc_dev.generate import generate
from cdc_dev.stack import manager, process
from cdc_dev.stack.components import Kafka, KafkaConnect, Postgres
from cdc_dev.stack.layout import StackLayout, StackPorts
from cdc_dev.stack.security import secret
from tests.debezium_helpers import (
    SOURCE_TABLES,
    AvroReader,
    drain,
    save_fixture,
    throwaway_connector,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]
PLACEHOLDER = "__debezium_unavailable_value"


def test_stack_up_from_nothing_and_down_frees_everything(
    stack, native_stack: StackLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second stack in a fresh state directory on other ports (downloads shared)."""
    shifted = {name: port + 200 for name, port in StackPorts().model_dump().items()}
    with tempfile.TemporaryDirectory(prefix="cdc-stack-") as root:
        # Set for this test only: the session's stack may name its own CDC_STACK_LIB.
        monkeypatch.setenv("CDC_STACK_LIB", str(native_stack.lib))
        layout = StackLayout(root=Path(root), ports=StackPorts(**shifted))
        try:
            manager.up(layout, connector="avro")
            states = manager.status(layout)
            assert [s.name for s in states if not s.healthy] == []
            assert all(s.pid for s in states)
            pids = [s.pid for s in states]

            assert manager.up(layout, connector=None)["total"] < 60, "a second `up` should find all running"
            assert [s.pid for s in manager.status(layout)] == pids, "a second `up` must not restart anything"
        finally:
            manager.down(layout)
        assert not any(process.is_alive(pid) for pid in pids)
        assert [p for p in layout.all_ports if process.port_open(p)] == []


def _rows(dsn: str, table: str) -> dict[int, dict]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return {row["id"]: row for row in cur.execute(f"SELECT * FROM {table}")}


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_generator_traffic_arrives_as_debezium_avro_events(stack, fixtures_dir: Path) -> None:
    generate(stack.postgres_dsn, rate=3000, duration=2, seed=11)  # rows that exist before: the snapshot
    reader = AvroReader(stack.schema_registry_url)
    with throwaway_connector(stack.connect_url, stack.postgres_dsn) as prefix:
        generate(stack.postgres_dsn, rate=3000, duration=4, seed=12)
        topics = [f"{prefix}.public.{t}" for t in SOURCE_TABLES]
        expected = {t: len(_rows(stack.postgres_dsn, t)) for t in SOURCE_TABLES}

        def every_live_row_seen(messages) -> bool:
            ids = defaultdict(set)
            for m in messages:
                if m.value is not None:
                    ids[m.topic].add(m.key)
            return all(len(ids[f"{prefix}.public.{t}"]) >= expected[t] for t in SOURCE_TABLES)

        messages = drain(stack.kafka_bootstrap, topics, until=every_live_row_seen)

    last_image: dict[str, dict[int, dict]] = defaultdict(dict)
    ops: dict[str, Counter] = defaultdict(Counter)
    saw_toast_placeholder = False
    for message in messages:
        table = message.topic.rsplit(".", 1)[1]
        event = reader.decode(message.value)
        if event is None:
            ops[table]["tombstone"] += 1
            continue
        ops[table][event["op"]] += 1
        assert event["source"]["table"] == table and event["source"]["lsn"] > 0
        image = event["after"] or event["before"]
        if event["op"] == "d":
            last_image[table].pop(image["id"], None)
        else:
            last_image[table][image["id"]] = event["after"]
        if table == "campaign" and event["op"] == "u" and event["after"]["creative"] == PLACEHOLDER:
            saw_toast_placeholder = True
        fixture = f"{table}_{event['op']}"
        if not (fixtures_dir / "envelopes" / f"{fixture}.json").exists():
            save_fixture(fixtures_dir / "envelopes", fixture, message, reader)

    for table in SOURCE_TABLES:
        assert ops[table]["r"] > 0 and ops[table]["c"] > 0, (table, ops[table])
    assert ops["campaign"]["u"] > 0 and ops["impressions"]["u"] > 0
    assert ops["impressions"]["d"] > 0 and ops["impressions"]["tombstone"] >= ops["impressions"]["d"]
    assert saw_toast_placeholder, "campaign updates that leave `creative` alone carry the TOAST placeholder"

    # The last image of every live row equals Postgres: NUMERIC, TIMESTAMPTZ and TOASTed text included.
    impressions = _rows(stack.postgres_dsn, "impressions")
    assert set(last_image["impressions"]) == set(impressions)
    for row_id, row in impressions.items():
        seen = last_image["impressions"][row_id]
        assert seen["cost"] == row["cost"] and isinstance(seen["cost"], Decimal)
        assert _ts(seen["created_at"]) == row["created_at"]
    campaigns = _rows(stack.postgres_dsn, "campaign")
    toasted = [
        i
        for i, r in campaigns.items()
        if len(r["creative"]) > 8000 and last_image["campaign"][i]["creative"] != PLACEHOLDER
    ]
    assert toasted, "some campaign's last event carries its TOASTed creative"
    for row_id in toasted:
        assert last_image["campaign"][row_id]["creative"] == campaigns[row_id]["creative"]
        assert last_image["campaign"][row_id]["bid_amount"] == campaigns[row_id]["bid_amount"]


def test_connect_worker_restart_loses_no_committed_change(stack, native_stack: StackLayout) -> None:
    """kill -9 of the worker while Debezium streams: every change committed in Postgres before,
    during and after the outage arrives, once (exactly-once source: the aborted transaction's
    records are never read, and the connector resumes from the offsets committed with them).

    The initial snapshot is left out on purpose (`snapshot.mode=no_data`): Debezium restarts an
    interrupted snapshot from scratch, which re-emits its `r` events by design."""
    reader = AvroReader(stack.schema_registry_url)
    with throwaway_connector(stack.connect_url, stack.postgres_dsn, **{"snapshot.mode": "no_data"}) as prefix:
        topic = f"{prefix}.public.impressions"
        before = set(_rows(stack.postgres_dsn, "impressions"))
        generate(stack.postgres_dsn, rate=3000, duration=3, seed=21)
        drain(stack.kafka_bootstrap, [topic], idle_seconds=1, until=lambda messages: len(messages) > 1000)
        worker = KafkaConnect(native_stack)
        pid = worker.pid
        assert pid is not None
        os.kill(pid, 9)  # the hardest stop: no offset flush, an open transaction aborted
        assert process.wait_until(lambda: not process.is_alive(pid), 30)
        generate(stack.postgres_dsn, rate=3000, duration=3, seed=22)  # committed while Connect is down
        worker.start()
        manager.wait_connector_running(native_stack, prefix, timeout=180)
        generate(stack.postgres_dsn, rate=3000, duration=2, seed=23)
        created = set(_rows(stack.postgres_dsn, "impressions")) - before

        def creates(messages) -> Counter:
            events = (reader.decode(m.value) for m in messages)
            return Counter(e["after"]["id"] for e in events if e is not None and e["op"] == "c")

        messages = drain(stack.kafka_bootstrap, [topic], until=lambda ms: created <= set(creates(ms)), timeout=240)
    seen = creates(messages)
    assert created <= set(seen), f"{len(created - set(seen))} committed inserts never reached Kafka"
    duplicated = {i: n for i, n in seen.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} inserts were delivered more than once"


def test_a_part_that_exits_while_starting_is_reported_with_the_end_of_its_log(
    native_stack: StackLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker whose log directory names another node exits at once: the error carries why,
    since a test's temporary stack takes its log along when it goes."""
    shifted = {name: port + 250 for name, port in StackPorts().model_dump().items()}
    with tempfile.TemporaryDirectory(prefix="cdc-stack-") as root:
        monkeypatch.setenv("CDC_STACK_LIB", str(native_stack.lib))
        layout = StackLayout(root=Path(root), ports=StackPorts(**shifted))
        broker = Kafka(layout)
        meta = layout.data(broker.name) / "logs" / "meta.properties"
        meta.parent.mkdir(parents=True)
        meta.write_text("version=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\nnode.id=7\n")
        # A stack secret in the log's last lines is not repeated in the error.
        planted = secret(layout, "kafka-admin")
        layout.log(broker.name).parent.mkdir(parents=True, exist_ok=True)
        layout.log(broker.name).write_text(f"sasl.jaas.config password={planted}\n")
        try:
            broker.start()
            with pytest.raises(manager.StackError) as failure:
                manager._wait_healthy(broker)
        finally:
            broker.stop()
    message = str(failure.value)
    assert message.startswith("kafka exited during start; the end of ")
    assert "node id" in message.lower(), message
    assert "password=" in message and planted not in message


def test_a_failed_psql_says_what_postgres_said_with_literals_masked(native_stack: StackLayout) -> None:
    postgres = Postgres(native_stack)
    with pytest.raises(RuntimeError) as failure:
        # A syntax error: psql echoes the statement's line, password and all.
        postgres.psql("ALTER ROLE cdc PASSWORD 'planted-secret-7' VALID UNTILL 'never'")
    message = str(failure.value)
    assert 'syntax error at or near "UNTILL"' in message and "LINE 1:" in message, message
    assert "planted-secret-7" not in message
