"""Where the native stack lives on disk and which loopback ports it takes.

Everything the stack writes (downloads, data, logs, pid files) stays under one state
directory, `.stack/` in the working directory unless `CDC_STACK_DIR` says otherwise.
Ports come from `CDC_STACK_<PART>_PORT` environment variables with defaults chosen
away from the well-known ports, so the stack runs beside a developer's own services.

Kafka and ClickHouse may run as several nodes (`CDC_STACK_KAFKA_BROKERS`,
`CDC_STACK_CLICKHOUSE_SHARDS`): node 1 keeps the part's ports, node n takes them plus
`NODE_PORT_STEP * (n - 1)`. A single node keeps the part's plain name (`kafka`); several are
numbered (`kafka-1`, `kafka-2`, ...), each with its own data directory, log and pid file.

`CDC_STACK_SECURE=1` runs the secured variant: TLS and passwords on every connection (see
components.py and security.py). It keeps its data in `<state>/data-secure`, apart from the plain
stack's: Kafka's SCRAM users are written when its storage is formatted, and Postgres' TLS and
passwords differ, so neither mode's data is usable by the other.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
NODE_PORT_STEP = 10
CLICKHOUSE_CLUSTER = "cdc"
# Copies a topic keeps when the cluster has brokers enough; one copy may be lost without
# stopping acks=all writes (min.insync.replicas one less).
MAX_REPLICATION_FACTOR = 3
# In the secured stack a TLS proxy holds each ClickHouse node's public ports and the node itself
# listens on loopback at its ports plus this (inside the node step, so nodes never collide).
CLICKHOUSE_PRIVATE_PORT_SHIFT = 5
# The user every client of the secured stack logs in as (Kafka SCRAM, ClickHouse, Postgres).
CLIENT_USER = "cdc"


class StackPorts(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDC_STACK_", extra="ignore")

    postgres_port: int = Field(15432, ge=1, le=65535)
    kafka_port: int = Field(19092, ge=1, le=65535)
    kafka_controller_port: int = Field(19093, ge=1, le=65535)
    connect_port: int = Field(18083, ge=1, le=65535)
    registry_port: int = Field(18081, ge=1, le=65535)
    registry_management_port: int = Field(18091, ge=1, le=65535)
    clickhouse_http_port: int = Field(18123, ge=1, le=65535)
    clickhouse_tcp_port: int = Field(19000, ge=1, le=65535)
    prometheus_port: int = Field(19090, ge=1, le=65535)
    metrics_port: int = Field(19108, ge=1, le=65535)
    lag_exporter_port: int = Field(19109, ge=1, le=65535)  # `cdc-consumer lag --serve`, when one runs
    audit_exporter_port: int = Field(19110, ge=1, le=65535)  # `cdc-consumer audit --serve`, when one runs


class StackShape(BaseSettings):
    """How many nodes the scalable parts run; bounded so every node's ports stay distinct."""

    model_config = SettingsConfigDict(env_prefix="CDC_STACK_", extra="ignore")

    kafka_brokers: int = Field(1, ge=1, le=5)
    clickhouse_shards: int = Field(1, ge=1, le=8)
    secure: bool = False


def _node_name(part: str, index: int, count: int) -> str:
    return part if count == 1 else f"{part}-{index}"


@dataclass(frozen=True)
class KafkaNode:
    """One combined broker and controller; its node id is its index (1-based)."""

    node_id: int
    name: str
    port: int
    controller_port: int

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def controller_address(self) -> str:
        return f"{HOST}:{self.controller_port}"


@dataclass(frozen=True)
class ClickHouseNode:
    """One ClickHouse server, shard `shard` of the cluster `cdc`."""

    shard: int
    name: str
    http_port: int
    tcp_port: int
    secure: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{HOST}:{self.http_port}"

    @property
    def server_http_port(self) -> int:
        """Where the ClickHouse process itself serves HTTP: behind the TLS proxy when secure."""
        return self.http_port + CLICKHOUSE_PRIVATE_PORT_SHIFT if self.secure else self.http_port

    @property
    def server_tcp_port(self) -> int:
        return self.tcp_port + CLICKHOUSE_PRIVATE_PORT_SHIFT if self.secure else self.tcp_port


@dataclass(frozen=True)
class StackLayout:
    root: Path
    ports: StackPorts
    kafka_brokers: int = 1
    clickhouse_shards: int = 1
    secure: bool = False

    def __post_init__(self) -> None:
        taken = Counter(self.all_ports)
        clashes = sorted(port for port, uses in taken.items() if uses > 1)
        if clashes:
            raise ValueError(f"stack ports {clashes} are used twice; choose other CDC_STACK_*_PORT values")

    @classmethod
    def from_env(cls) -> StackLayout:
        """`CDC_STACK_DIR` and per-port variables; `CDC_STACK_PORT_OFFSET` shifts every default
        port at once, so a second stack (a colleague's, a test's) runs beside the first.
        `CDC_STACK_KAFKA_BROKERS` and `CDC_STACK_CLICKHOUSE_SHARDS` set the node counts,
        `CDC_STACK_SECURE=1` the secured variant."""
        root = Path(os.environ.get("CDC_STACK_DIR", ".stack")).resolve()
        offset = int(os.environ.get("CDC_STACK_PORT_OFFSET", "0"))
        shifted = {name: field.default + offset for name, field in StackPorts.model_fields.items()}
        shape = StackShape()
        return cls(
            root=root,
            ports=StackPorts(**{**shifted, **StackPorts().model_dump(exclude_defaults=True)}),
            kafka_brokers=shape.kafka_brokers,
            clickhouse_shards=shape.clickhouse_shards,
            secure=shape.secure,
        )

    @property
    def kafka_nodes(self) -> list[KafkaNode]:
        return [
            KafkaNode(
                node_id=index,
                name=_node_name("kafka", index, self.kafka_brokers),
                port=self.ports.kafka_port + NODE_PORT_STEP * (index - 1),
                controller_port=self.ports.kafka_controller_port + NODE_PORT_STEP * (index - 1),
            )
            for index in range(1, self.kafka_brokers + 1)
        ]

    @property
    def clickhouse_nodes(self) -> list[ClickHouseNode]:
        return [
            ClickHouseNode(
                shard=index,
                name=_node_name("clickhouse", index, self.clickhouse_shards),
                http_port=self.ports.clickhouse_http_port + NODE_PORT_STEP * (index - 1),
                tcp_port=self.ports.clickhouse_tcp_port + NODE_PORT_STEP * (index - 1),
                secure=self.secure,
            )
            for index in range(1, self.clickhouse_shards + 1)
        ]

    @property
    def all_ports(self) -> list[int]:
        """Every port the stack listens on (or, for the consumer's and exporter's, reserves)."""
        node_ports = {"kafka_port", "kafka_controller_port", "clickhouse_http_port", "clickhouse_tcp_port"}
        fixed = [port for name, port in self.ports.model_dump().items() if name not in node_ports]
        kafka = [port for node in self.kafka_nodes for port in (node.port, node.controller_port)]
        clickhouse = [port for node in self.clickhouse_nodes for port in (node.http_port, node.tcp_port)]
        if self.secure:
            clickhouse += [
                port for node in self.clickhouse_nodes for port in (node.server_http_port, node.server_tcp_port)
            ]
        return fixed + kafka + clickhouse

    @property
    def kafka_replication_factor(self) -> int:
        return min(MAX_REPLICATION_FACTOR, self.kafka_brokers)

    @property
    def kafka_min_insync_replicas(self) -> int:
        return max(1, self.kafka_replication_factor - 1)

    @property
    def lib(self) -> Path:
        # Downloads can be shared between state directories (tests run a second stack).
        return Path(os.environ.get("CDC_STACK_LIB", self.root / "lib")).resolve()

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def data(self, component: str) -> Path:
        return self.root / ("data-secure" if self.secure else "data") / component

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pidfile(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    def secret(self, name: str) -> str:
        from cdc_dev.stack.security import secret

        return secret(self, name)

    def certificates(self):
        """The secured stack's TLS files (security.Certificates), made on first use."""
        from cdc_dev.stack.security import certificates

        return certificates(self)

    def client_password(self, service: str) -> str:
        """The password of CLIENT_USER for `service` (postgres, kafka, clickhouse): the
        documented `cdc` of the plain Postgres, random ones in the secured stack."""
        if service == "postgres" and not self.secure:
            return CLIENT_USER
        return self.secret(f"{service}-{CLIENT_USER}")

    # Connection settings the rest of the project reads (`cdc-consumer stack env`).
    @property
    def postgres_dsn(self) -> str:
        dsn = f"postgresql://{CLIENT_USER}:{self.client_password('postgres')}@{HOST}:{self.ports.postgres_port}/adtech"
        if self.secure:
            dsn += f"?sslmode=verify-full&sslrootcert={quote(str(self.certificates().ca))}"
        return dsn

    @property
    def kafka_bootstrap(self) -> str:
        return ",".join(node.address for node in self.kafka_nodes)

    @property
    def connect_url(self) -> str:
        return f"http://{HOST}:{self.ports.connect_port}"

    @property
    def schema_registry_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{HOST}:{self.ports.registry_port}/apis/ccompat/v7"

    @property
    def clickhouse_url(self) -> str:
        return self.clickhouse_nodes[0].url

    @property
    def prometheus_url(self) -> str:
        return f"http://{HOST}:{self.ports.prometheus_port}"

    def kafka_client_properties(self) -> dict[str, str]:
        """librdkafka properties of a client of this stack (the `CDC_KAFKA_*` of connection_env)."""
        properties = {"bootstrap.servers": self.kafka_bootstrap}
        if self.secure:
            properties.update(
                {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": CLIENT_USER,
                    "sasl.password": self.client_password("kafka"),
                    "ssl.ca.location": str(self.certificates().ca),
                }
            )
        return properties

    def connection_env(self) -> dict[str, str]:
        env = {
            "CDC_POSTGRES_DSN": self.postgres_dsn,
            "CDC_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CDC_CONNECT_URL": self.connect_url,
            "CDC_SCHEMA_REGISTRY_URL": self.schema_registry_url,
            "CDC_CLICKHOUSE_URL": self.clickhouse_url,
            "CDC_PROMETHEUS_URL": self.prometheus_url,
        }
        if self.clickhouse_shards > 1:
            env["CDC_CLICKHOUSE_CLUSTER"] = CLICKHOUSE_CLUSTER
            env["CDC_CLICKHOUSE_SHARD_URLS"] = ",".join(node.url for node in self.clickhouse_nodes)
        if self.secure:
            kafka = self.kafka_client_properties()
            ca = str(self.certificates().ca)
            env.update(
                {
                    "CDC_KAFKA_SECURITY_PROTOCOL": kafka["security.protocol"],
                    "CDC_KAFKA_SASL_MECHANISM": kafka["sasl.mechanism"],
                    "CDC_KAFKA_SASL_USERNAME": kafka["sasl.username"],
                    "CDC_KAFKA_SASL_PASSWORD": kafka["sasl.password"],
                    "CDC_KAFKA_SSL_CA_LOCATION": ca,
                    "CDC_CLICKHOUSE_USER": CLIENT_USER,
                    "CDC_CLICKHOUSE_PASSWORD": self.client_password("clickhouse"),
                    "CDC_CLICKHOUSE_CA_CERT": ca,
                    "CDC_SCHEMA_REGISTRY_CA_CERT": ca,
                }
            )
        return env
