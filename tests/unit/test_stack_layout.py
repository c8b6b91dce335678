"""How the native stack's node counts become nodes, ports, names, settings and configs (no processes)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import ValidationError

from cdc_dev.stack.clickhouse_server import write_config
from cdc_dev.stack.components import ClickHouse, Kafka, all_components
from cdc_dev.stack.layout import StackLayout, StackPorts

SHAPE_VARIABLES = ("CDC_STACK_KAFKA_BROKERS", "CDC_STACK_CLICKHOUSE_SHARDS", "CDC_STACK_PORT_OFFSET")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in SHAPE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CDC_STACK_DIR", str(tmp_path))
    return monkeypatch


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_one_node_each_keeps_todays_names_ports_and_settings(env) -> None:
    layout = StackLayout.from_env()
    assert [c.name for c in all_components(layout)] == [
        "postgres",
        "kafka",
        "registry",
        "clickhouse",
        "prometheus",
        "connect",
    ]
    assert layout.kafka_bootstrap == "127.0.0.1:19092"
    assert layout.clickhouse_url == "http://127.0.0.1:18123"
    assert "CDC_CLICKHOUSE_CLUSTER" not in layout.connection_env()
    kafka = _properties(Kafka(layout).config_file().read_text())
    assert kafka["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert kafka["offsets.topic.replication.factor"] == kafka["transaction.state.log.min.isr"] == "1"
    assert Kafka(layout).config_file().parent == layout.data("kafka")


def test_three_brokers_form_one_quorum_with_three_copies_of_every_topic(env) -> None:
    env.setenv("CDC_STACK_KAFKA_BROKERS", "3")
    env.setenv("CDC_STACK_PORT_OFFSET", "5000")
    layout = StackLayout.from_env()
    brokers = [c for c in all_components(layout) if isinstance(c, Kafka)]
    assert [b.name for b in brokers] == ["kafka-1", "kafka-2", "kafka-3"]
    assert layout.connection_env()["CDC_KAFKA_BOOTSTRAP"] == "127.0.0.1:24092,127.0.0.1:24102,127.0.0.1:24112"
    configs = [_properties(b.config_file().read_text()) for b in brokers]
    assert [c["node.id"] for c in configs] == ["1", "2", "3"]
    voters = "1@127.0.0.1:24093,2@127.0.0.1:24103,3@127.0.0.1:24113"
    assert {c["controller.quorum.voters"] for c in configs} == {voters}
    assert [c["listeners"] for c in configs][1] == "PLAINTEXT://127.0.0.1:24102,CONTROLLER://127.0.0.1:24103"
    assert len({c["log.dirs"] for c in configs}) == 3
    for config in configs:
        assert config["default.replication.factor"] == config["transaction.state.log.replication.factor"] == "3"
        assert config["min.insync.replicas"] == config["transaction.state.log.min.isr"] == "2"


def test_shards_get_numbered_names_their_own_ports_and_the_cluster_in_env(env) -> None:
    env.setenv("CDC_STACK_CLICKHOUSE_SHARDS", "2")
    layout = StackLayout.from_env()
    shards = [c for c in all_components(layout) if isinstance(c, ClickHouse)]
    assert [(s.name, s.ports) for s in shards] == [("clickhouse-1", [18123, 19000]), ("clickhouse-2", [18133, 19010])]
    env_vars = layout.connection_env()
    assert env_vars["CDC_CLICKHOUSE_URL"] == "http://127.0.0.1:18123"
    assert env_vars["CDC_CLICKHOUSE_CLUSTER"] == "cdc"
    assert env_vars["CDC_CLICKHOUSE_SHARD_URLS"] == "http://127.0.0.1:18123,http://127.0.0.1:18133"


def test_clickhouse_config_declares_one_shard_per_node(tmp_path: Path) -> None:
    config = write_config(tmp_path, 18123, 19000, cluster="cdc", shards=[("127.0.0.1", 19000), ("127.0.0.1", 19010)])
    root = ET.parse(config).getroot()
    shards = root.findall("./remote_servers/cdc/shard/replica")
    assert [(r.findtext("host"), r.findtext("port")) for r in shards] == [
        ("127.0.0.1", "19000"),
        ("127.0.0.1", "19010"),
    ]
    assert root.findtext("background_distributed_schedule_pool_size") == "4"
    alone = ET.parse(write_config(tmp_path, 18123, 19000)).getroot()
    assert alone.find("remote_servers") is None
    with pytest.raises(ValueError):
        write_config(tmp_path, 18123, 19000, cluster="cdc><x")


def test_node_counts_are_bounded_and_ports_may_not_clash(env) -> None:
    env.setenv("CDC_STACK_KAFKA_BROKERS", "0")
    with pytest.raises(ValidationError):
        StackLayout.from_env()
    env.setenv("CDC_STACK_KAFKA_BROKERS", "50")
    with pytest.raises(ValidationError):
        StackLayout.from_env()
    # Shard 2's HTTP port would land on the registry's.
    with pytest.raises(ValueError, match="used twice"):
        StackLayout(root=Path("."), ports=StackPorts(registry_port=18133), clickhouse_shards=2)
