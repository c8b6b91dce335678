"""How the native stack's node counts become nodes, ports, names, settings and configs (no processes)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import ValidationError

from cdc_dev.stack.clickhouse_server import write_config
from cdc_dev.stack.components import (
    CONNECT_ENV_ALLOWLIST,
    CONNECT_INHERITED_ENV,
    ClickHouse,
    ClickHouseTls,
    Kafka,
    KafkaConnect,
    Postgres,
    all_components,
)
from cdc_dev.stack.layout import StackLayout, StackPorts

SHAPE_VARIABLES = (
    "CDC_STACK_KAFKA_BROKERS",
    "CDC_STACK_CLICKHOUSE_SHARDS",
    "CDC_STACK_PORT_OFFSET",
    "CDC_STACK_SECURE",
)


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


def test_the_secured_stack_has_tls_and_passwords_in_every_config(env) -> None:
    env.setenv("CDC_STACK_SECURE", "1")
    env.setenv("CDC_STACK_CLICKHOUSE_SHARDS", "2")
    layout = StackLayout.from_env()
    assert layout.secure and layout.data("kafka") == layout.root / "data-secure" / "kafka"
    names = [c.name for c in all_components(layout)]
    assert names.index("clickhouse-tls") > names.index("clickhouse-2")
    kafka = _properties(Kafka(layout).config_file().read_text())
    assert kafka["listeners"] == "SASL_SSL://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert kafka["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert kafka["inter.broker.listener.name"] == "SASL_SSL"
    assert Path(kafka["ssl.keystore.location"]).exists()
    assert (Kafka(layout).config_file().stat().st_mode & 0o077) == 0, "it holds passwords"
    # ClickHouse moves behind the proxy: its own ports are private, the usual ones the proxy's.
    shards = [c for c in all_components(layout) if isinstance(c, ClickHouse)]
    assert [s.ports for s in shards] == [[18128, 19005], [18138, 19015]]
    proxy = ClickHouseTls(layout)
    assert proxy.ports == [18123, 19000, 18133, 19010]
    haproxy = proxy.config_file().read_text()
    assert "bind 127.0.0.1:18123 ssl crt" in haproxy and "server node 127.0.0.1:18128" in haproxy
    assert layout.client_password("clickhouse").encode().hex().upper() in haproxy
    env_vars = layout.connection_env()
    assert env_vars["CDC_CLICKHOUSE_URL"] == "https://127.0.0.1:18123"
    assert env_vars["CDC_SCHEMA_REGISTRY_URL"].startswith("https://")
    assert env_vars["CDC_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env_vars["CDC_POSTGRES_DSN"].endswith(f"sslmode=verify-full&sslrootcert={layout.root}/tls/ca.pem")
    assert len({env_vars["CDC_KAFKA_SASL_PASSWORD"], env_vars["CDC_CLICKHOUSE_PASSWORD"]}) == 2
    assert layout.client_password("postgres") != "cdc"
    assert (layout.root / "secrets").stat().st_mode & 0o777 == 0o700


def test_the_plain_stack_keeps_its_addresses_and_postgres_needs_passwords_locally_too(env) -> None:
    layout = StackLayout.from_env()
    assert layout.postgres_dsn == "postgresql://cdc:cdc@127.0.0.1:15432/adtech"
    assert not any(k.startswith(("CDC_KAFKA_S", "CDC_CLICKHOUSE_PASSWORD")) for k in layout.connection_env())
    hba = Postgres(layout)._hba()
    assert "trust" not in hba and hba.startswith("local all all scram-sha-256")
    secure_hba = Postgres(StackLayout(root=layout.root, ports=layout.ports, secure=True))._hba()
    assert "\nhost " not in secure_hba and "hostssl all all 127.0.0.1/32 scram-sha-256" in secure_hba


def test_connect_gets_an_allowlisted_environment_and_provider(env) -> None:
    env.setenv("AWS_SECRET_ACCESS_KEY", "planted")
    env.setenv("CDC_CLICKHOUSE_PASSWORD", "planted")
    worker = KafkaConnect(StackLayout.from_env())
    variables = worker.worker_env()
    assert "planted" not in variables.values()
    assert set(variables) <= {*CONNECT_INHERITED_ENV} | {
        "CDC_SOURCE_DB_HOST",
        "CDC_SOURCE_DB_PORT",
        "CDC_SOURCE_DB_NAME",
        "CDC_SOURCE_DB_USER",
        "CDC_SOURCE_DB_PASSWORD",
        "CDC_SOURCE_DB_SSLMODE",
        "CDC_SOURCE_DB_SSLROOTCERT",
        "CDC_SCHEMA_REGISTRY_URL",
    }
    assert all(re.fullmatch(CONNECT_ENV_ALLOWLIST, name) for name in variables if name.startswith("CDC_"))
    properties = _properties(worker._properties().read_text())
    assert properties["config.providers.env.param.allowlist.pattern"] == CONNECT_ENV_ALLOWLIST


def test_secured_connect_logs_in_with_scram_for_every_client_it_makes(env) -> None:
    env.setenv("CDC_STACK_SECURE", "1")
    properties = _properties(KafkaConnect(StackLayout.from_env())._properties().read_text())
    for prefix in ("", "producer.", "consumer.", "admin."):
        assert properties[f"{prefix}security.protocol"] == "SASL_SSL"
        assert properties[f"{prefix}sasl.mechanism"] == "SCRAM-SHA-512"
        assert 'username="connect"' in properties[f"{prefix}sasl.jaas.config"]
