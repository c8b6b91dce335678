"""Operations on the real stack: Prometheus scraping a running consumer (and the lag exporter),
every PromQL expression of the dashboard and of the alert rules, lag while the consumer is down
and after it caught up, replay/backfill idempotency and restore, and --move-group's refusal."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from cdc_dev.generate import generate
from cdc_dev.stack.components import Prometheus
from cdc_dev.stack.layout import REPO_ROOT
from cdc_dev.verify import compare, totals
from consumer.transform.mapping import DEFAULT_MAPPING
from tests.consumer_helpers import (
    audit_issues,
    new_target,
    run_audit,
    running_consumer,
    start_consumer,
    wait_caught_up,
)

DASHBOARD = REPO_ROOT / "dashboards" / "cdc-consumer.json"
ALERTS = REPO_ROOT / "dashboards" / "alerts.yml"
FACTS = ("fact_impressions", "fact_clicks")


# -- helpers ----------------------------------------------------------------------------------
def cli(target, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", *args],
        env={**target.env, "CDC_METRICS_PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lag_json(target) -> dict:
    done = cli(target, "lag", "--json", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def replay_json(target, *args: str) -> dict:
    done = cli(target, "replay", "--json", *args)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads(done.stdout)


class PrometheusApi:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list:
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> dict[str, set[str]]:
        answer = requests.get(f"{self.url}/api/v1/alerts", timeout=30).json()
        states: dict[str, set[str]] = {}
        for alert in answer["data"]["alerts"]:
            states.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
        return states

    def wait(self, what: str, check, timeout: float = 60, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"Prometheus: {what} not seen within {timeout}s (last: {last})")


def dashboard_expressions() -> list[str]:
    exprs: list[str] = []

    def walk(panels: list) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return exprs


def alert_rules() -> list[dict]:
    import yaml

    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def with_bool(expr: str) -> str:
    """An alert expression that returns its series whether or not it fires: every comparison
    outside label matchers becomes `<op> bool` (0/1 instead of a filter)."""
    parts = re.split(r"(\{[^}]*\})", expr)
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"(==|!=|>=|<=|>|<)(?!\s*bool)", r"\1 bool", parts[i])
    return "".join(parts)


def poison_mapping(tmp_path: Path, topic: str) -> Path:
    """The shipped mapping plus one topic of our own, where poison messages feed the DLQ
    metrics without touching the shared change topics."""
    path = tmp_path / "mapping.toml"
    path.write_text(
        DEFAULT_MAPPING.read_text()
        + f"""
[tables.ops_poison]
topic = "{topic}"
role = "fact"
key = ["id"]
columns = {{ id = "Int64", campaign_id = "Int64", created_at = "DateTime64(6, 'UTC')", cost = "Decimal(12, 6)" }}
"""
    )
    return path


def fact_totals(stack, target) -> dict:
    return {
        table: (t.postgres, t.clickhouse, t.clickhouse_rows, t.clickhouse_aggregate)
        for table, t in totals(stack.postgres_dsn, target.clickhouse()).items()
        if t.clickhouse_aggregate is not None
    }


def assert_matches_postgres(stack, target) -> None:
    report = compare(stack.postgres_dsn, target.clickhouse())
    assert report.ok, str(report)


# -- tests ------------------------------------------------------------------------------------
def _serve(target, tmp_path, command: str, port: int, interval: float) -> subprocess.Popen:
    """`cdc-consumer <command> --serve PORT` beside the consumer, as an operator runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", command, "--serve", str(port), "--interval", str(interval)],
        env={**target.env, "CDC_METRICS_PORT": "0"},
        stdout=(tmp_path / f"{command}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).exists():
        pytest.skip("promtool not installed (Debian package prometheus)")
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_dashboard_covers_the_issue() -> None:
    joined = "\n".join(dashboard_expressions())
    for metric in (
        "cdc_consumer_lag_messages",
        "cdc_consumer_lag_seconds",
        "cdc_messages_consumed_total",
        "cdc_insert_duration_seconds_bucket",
        "cdc_dlq_messages_total",
        "cdc_rebalances_total",
        "cdc_paused_partitions",
    ):
        assert metric in joined, metric
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "CdcConsumerDown",
        "CdcConsumerLagGrowing",
        "CdcConsumerLagSecondsHigh",
        "CdcDeadLetters",
        "CdcNoSuccessfulInsert",
    } <= names


@pytest.mark.stack
@pytest.mark.slow
def test_prometheus_sees_lag_rise_while_stopped_and_every_expression_returns_data(
    stack, native_stack, tmp_path
) -> None:
    layout = native_stack
    prometheus = PrometheusApi(stack.prometheus_url)
    # The stack may have started before dashboards/alerts.yml existed: write its config anew and reload.
    Prometheus(layout).config_file()
    requests.post(f"{stack.prometheus_url}/-/reload", timeout=30).raise_for_status()
    rules = {
        r["name"]
        for g in requests.get(f"{stack.prometheus_url}/api/v1/rules", timeout=30).json()["data"]["groups"]
        for r in g["rules"]
    }
    assert {r["alert"] for r in alert_rules()} <= rules

    poison_topic = f"ops-poison-{uuid.uuid4().hex[:8]}"
    target = new_target(
        stack,
        tmp_path,
        CDC_METRICS_PORT=str(layout.ports.metrics_port),
        CDC_MAPPING_FILE=str(poison_mapping(tmp_path, poison_topic)),
    )
    assert cli(target, "migrate").returncode == 0
    target.clickhouse().command("CREATE TABLE ops_poison AS fact_impressions")
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    admin.create_topics([NewTopic(poison_topic, 1, 1)])[poison_topic].result(30)
    exporter = _serve(target, tmp_path, "lag", layout.ports.lag_exporter_port, interval=2)
    auditor = _serve(target, tmp_path, "audit", layout.ports.audit_exporter_port, interval=5)
    total_lag = "sum(max by (topic, partition) (cdc_consumer_lag_messages))"
    try:
        consumer = start_consumer(target, tmp_path)
        try:
            generate(stack.postgres_dsn, rate=2000, duration=6, seed=501)
            wait_caught_up(stack, target, consumer)
            metrics_url = f"http://127.0.0.1:{layout.ports.metrics_port}"
            assert requests.get(f"{metrics_url}/healthz", timeout=10).status_code == 200
            assert requests.get(f"{metrics_url}/readyz", timeout=10).json()["status"] == "ok"
            prometheus.wait("the consumer scraped", lambda: prometheus.value('up{job="cdc-consumer"}') == 1)
            prometheus.wait("the exporter scraped", lambda: prometheus.value('up{job="cdc-lag-exporter"}') == 1)
            prometheus.wait("lag 0 after catching up", lambda: prometheus.value(total_lag) == 0, timeout=60)
        finally:
            assert consumer.stop() == 0, consumer.output()[-3000:]

        # The consumer is down and Debezium keeps writing: lag grows, as the exporter reports it.
        traffic = threading.Thread(
            target=generate, args=(stack.postgres_dsn,), kwargs=dict(rate=2000, duration=12, seed=502)
        )
        traffic.start()
        seen = []
        while traffic.is_alive():
            seen.append(prometheus.value(total_lag) or 0)
            time.sleep(2)
        traffic.join()
        assert max(seen) > 0 and any(b > a for a, b in itertools.pairwise(seen)), f"lag should rise: {seen}"
        behind = lag_json(target)
        assert behind["members"] == 0
        assert behind["total_lag"] > 0 and 0 < behind["max_lag_seconds"] < 120, behind
        down = prometheus.wait(
            "CdcConsumerDown pending", lambda: prometheus.alerts().get("CdcConsumerDown"), timeout=45
        )
        print("lag while the consumer is down:", seen, "CdcConsumerDown:", down)

        # It comes back and catches up: 0 again, in Kafka and in Prometheus.
        with running_consumer(target, tmp_path) as consumer:
            wait_caught_up(stack, target, consumer)
            prometheus.wait("lag back to 0", lambda: prometheus.value(total_lag) == 0, timeout=60)
            caught_up = lag_json(target)
            assert caught_up["total_lag"] == 0 and caught_up["max_lag_seconds"] == 0, caught_up
            assert all(p["lag"] == 0 for p in caught_up["partitions"])
            assert prometheus.value("max(cdc_consumer_lag_seconds)") == 0
            # Two poison messages: dead-lettered, counted, alerted on (their class's first messages).
            producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
            for _ in range(2):
                producer.produce(poison_topic, key=b"poison", value=b'{"op": "c", "after": {"id": 1,')
            producer.flush(30)
            prometheus.wait("CdcDeadLetters", lambda: prometheus.alerts().get("CdcDeadLetters"), timeout=45)
            prometheus.wait("lag 0 past the poison", lambda: prometheus.value(total_lag) == 0, timeout=60)
            time.sleep(6)  # one more scrape: rate() windows hold two samples of every series
            prometheus.wait("the audit scraped", lambda: prometheus.value('up{job="cdc-audit"}') == 1)
            audit = "sum(cdc_audit_unaccounted_offsets) + sum(cdc_audit_duplicated_offsets)"
            prometheus.wait("an audit exported", lambda: prometheus.value(audit) is not None, timeout=60)
            assert prometheus.value(audit) == 0

            empty = [e for e in dashboard_expressions() if not prometheus.query(e)]
            assert not empty, f"dashboard expressions without data: {empty}"
            empty = [r["alert"] for r in alert_rules() if not prometheus.query(with_bool(r["expr"]))]
            assert not empty, f"alert expressions without data: {empty}"
            assert_matches_postgres(stack, target)
    finally:
        for process in (exporter, auditor):
            process.send_signal(signal.SIGTERM)
            process.wait(30)


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.secure
def test_replay_is_idempotent_and_restores_dropped_facts_beside_the_live_consumer(stack, tmp_path) -> None:
    target = new_target(stack, tmp_path)
    with running_consumer(target, tmp_path) as consumer:
        since = time.time() - 1
        generate(stack.postgres_dsn, rate=2000, duration=6, seed=601)
        wait_caught_up(stack, target, consumer)
        assert_matches_postgres(stack, target)
        before = fact_totals(stack, target)

        # Over a range ClickHouse holds: nothing changes (not one fact row is written).
        report = replay_json(target, "--from-timestamp", str(int(since)))
        assert report["completed"] and report["mode"] == "backfill"
        assert report["messages_read"] > 0 and report["already_applied"] > 0
        assert all(report["rows_inserted"][t] == 0 for t in FACTS), report["rows_inserted"]
        assert fact_totals(stack, target) == before
        assert_matches_postgres(stack, target)

        # The facts (and the aggregate the materialized views feed) are gone; the live consumer
        # keeps running and traffic flows while the backfill restores them.
        ch = target.clickhouse()
        for table in (*FACTS, "agg_campaign_daily"):
            ch.command(f"TRUNCATE TABLE {table}")
        traffic = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "generate", "--rate", "1500", "--duration", "8", "--seed", "602"],
            env=target.env,
            stdout=subprocess.DEVNULL,
        )
        time.sleep(3)
        report = replay_json(target, "--from-beginning")
        assert traffic.wait(120) == 0
        assert report["completed"]
        assert all(report["rows_inserted"][t] > 0 for t in FACTS), report["rows_inserted"]
        wait_caught_up(stack, target, consumer)
        assert_matches_postgres(stack, target)
        restored = fact_totals(stack, target)
        assert all(pg == live == agg for pg, live, _rows, agg in restored.values()), restored
        # Every change applied once: the restored ones written twice, their rows held once.
        code, audit = run_audit(target)
        assert code == 0 and audit["ok"], audit_issues(audit)[:20]
        assert consumer.stop() == 0, consumer.output()[-3000:]
    groups = [g.group_id for g in AdminClient(stack.kafka).list_consumer_groups().result().valid]
    assert not [g for g in groups if g.startswith(f"{target.group_id}-backfill-")], "backfill groups are deleted"


@pytest.mark.stack
@pytest.mark.slow
def test_move_group_is_refused_while_a_member_is_active_and_replays_once_stopped(stack, tmp_path) -> None:
    target = new_target(stack, tmp_path)
    with running_consumer(target, tmp_path) as consumer:
        generate(stack.postgres_dsn, rate=2000, duration=4, seed=701)
        wait_caught_up(stack, target, consumer)
        refused = cli(target, "replay", "--move-group", "--from-beginning", "--no-progress")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "active member" in refused.stdout and "--move-group" in refused.stdout
        assert lag_json(target)["total_lag"] == 0, "the refused replay moved nothing"
        assert consumer.stop() == 0

    for table in FACTS:
        target.clickhouse().command(f"TRUNCATE TABLE {table}")
    target.clickhouse().command("TRUNCATE TABLE agg_campaign_daily")
    report = replay_json(target, "--move-group", "--from-beginning")
    assert report["completed"] and report["mode"] == "move-group" and report["group"] == target.group_id
    assert lag_json(target)["total_lag"] == 0, "the group stays at the bound: the service resumes there"
    assert_matches_postgres(stack, target)


def test_service_units_run_the_commands_and_ports_of_the_stack() -> None:
    import configparser

    import yaml

    from cdc_dev.stack.layout import StackPorts
    from consumer.cli import build_parser

    def unit(name: str) -> configparser.ConfigParser:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read(REPO_ROOT / "deploy" / name)
        return parser

    consumer = unit("cdc-consumer.service")["Service"]
    assert consumer["ExecStart"].split()[1:] == ["run"]
    assert consumer["KillSignal"] == "SIGTERM" and int(consumer["TimeoutStopSec"]) >= 60
    assert consumer["Restart"] == "always"
    exporter = unit("cdc-lag-exporter.service")["Service"]["ExecStart"].split()[1:]
    assert exporter == ["lag", "--serve", str(StackPorts().lag_exporter_port)]
    build_parser().parse_args(exporter)  # a command the CLI knows
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["lag-exporter"]["command"] == exporter
