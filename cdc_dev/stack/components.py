"""The parts of the native stack: how each one is configured, started and probed.

Every part binds loopback only, keeps its data under `<state>/data/<part>`, logs to
`<state>/logs/<part>.log` and is tracked by `<state>/run/<part>.pid`, so `stack down`
stops exactly what `stack up` started.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import requests

from cdc_dev.stack import process
from cdc_dev.stack.install import java_home_for_registry
from cdc_dev.stack.layout import (
    CLICKHOUSE_CLUSTER,
    HOST,
    REPO_ROOT,
    ClickHouseNode,
    KafkaNode,
    StackLayout,
)

log = logging.getLogger(__name__)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
JAVA17 = Path(os.environ.get("CDC_JAVA_HOME", "/usr/lib/jvm/java-17-openjdk-amd64"))
SOURCE_DB_USER = "cdc"
SOURCE_DB_PASSWORD = "cdc"
LAST_QUORUM_NODE_STOP_S = 5.0

LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.kafkaorg.name = org.apache.kafka
logger.kafkaorg.level = WARN
logger.connect.name = org.apache.kafka.connect.runtime.rest
logger.connect.level = WARN
logger.debezium.name = io.debezium
logger.debezium.level = INFO
"""


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _java(home: Path) -> str:
    return str(home / "bin" / "java") if (home / "bin" / "java").exists() else "java"


@dataclass
class Component(ABC):
    layout: StackLayout
    name: str = ""
    # Seconds a cold start may take before `stack up` gives up on it.
    start_timeout: float = 120.0

    @property
    @abstractmethod
    def address(self) -> str: ...

    @property
    @abstractmethod
    def ports(self) -> list[int]: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def healthy(self) -> bool: ...

    @property
    def pid(self) -> int | None:
        return process.read_pid(self.layout.pidfile(self.name))

    def stop(self) -> bool:
        return process.stop(self.layout.pidfile(self.name))

    def _spawn(
        self, argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, **identity
    ) -> None:
        process.spawn(
            argv,
            log_file=self.layout.log(self.name),
            pid_file=self.layout.pidfile(self.name),
            cwd=cwd,
            env=env,
            **identity,
        )

    def _log4j2(self) -> Path:
        path = self.layout.root / "log4j2.properties"
        path.write_text(LOG4J2)
        return path


def _allow_traverse(directory: Path) -> None:
    """The `postgres` user must reach its data directory: add search (x) permission for
    others on every ancestor that lacks it (never read permission)."""
    for ancestor in [directory, *directory.parents]:
        mode = ancestor.stat().st_mode
        if not mode & 0o001:
            log.warning("adding o+x to %s so the postgres user can reach its data directory", ancestor)
            ancestor.chmod(mode | 0o001)


@dataclass
class Postgres(Component):
    """PostgreSQL 15 as its own cluster in the state directory, never the system one."""

    name: str = "postgres"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.layout.ports.postgres_port}"

    @property
    def ports(self) -> list[int]:
        return [self.layout.ports.postgres_port]

    @property
    def data_dir(self) -> Path:
        return self.layout.data("postgres")

    @property
    def socket_dir(self) -> Path:
        return self.layout.data("postgres-socket")

    @property
    def os_user(self) -> str | None:
        # Postgres refuses to run as root; as root we hand the cluster to the `postgres` user.
        return "postgres" if os.geteuid() == 0 else None

    def _identity(self) -> dict:
        """Run as the postgres user with its own group only: root's group would make the
        kernel check directories' group bits instead of the others' bits we rely on."""
        if not self.os_user:
            return {}
        return {"user": self.os_user, "group": pwd.getpwnam(self.os_user).pw_gid, "extra_groups": []}

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.os_user:
            _allow_traverse(path.parent)
            entry = pwd.getpwnam(self.os_user)
            shutil.chown(path, entry.pw_uid, entry.pw_gid)
            path.chmod(0o700)

    def start(self) -> None:
        self._own(self.socket_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._own(self.data_dir)
            subprocess.run(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                cwd="/",
                **self._identity(),
            )
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write(f"host replication all {HOST}/32 scram-sha-256\n")
        self._spawn(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(self.data_dir),
                "-c",
                f"port={self.layout.ports.postgres_port}",
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                f"unix_socket_directories={self.socket_dir}",
                # Debezium streams with pgoutput from a logical replication slot.
                "-c",
                "wal_level=logical",
                "-c",
                "max_replication_slots=10",
                "-c",
                "max_wal_senders=10",
                "-c",
                "shared_buffers=256MB",
                "-c",
                "max_wal_size=2GB",
            ],
            cwd=Path("/"),
            **self._identity(),
        )

    def healthy(self) -> bool:
        return (
            subprocess.run(
                [
                    str(PG_BIN / "pg_isready"),
                    "-q",
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.layout.ports.postgres_port),
                ],
                check=False,
            ).returncode
            == 0
        )

    def psql(self, sql: str, database: str = "postgres", user: str = "postgres") -> str:
        return subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.layout.ports.postgres_port),
                "-U",
                user,
                "-d",
                database,
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def provision(self) -> None:
        """The `cdc` role (owner of the source tables, allowed to replicate) and the schema."""
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{SOURCE_DB_USER}'").strip():
            self.psql(f"CREATE ROLE {SOURCE_DB_USER} LOGIN REPLICATION CREATEDB PASSWORD '{SOURCE_DB_PASSWORD}'")
        if not self.psql("SELECT 1 FROM pg_database WHERE datname = 'adtech'").strip():
            self.psql(f"CREATE DATABASE adtech OWNER {SOURCE_DB_USER}")
        schema = (REPO_ROOT / "postgres" / "schema.sql").read_text()
        self.psql(schema, database="adtech", user=SOURCE_DB_USER)


@dataclass
class Kafka(Component):
    """Kafka 4 in KRaft mode: each node is both broker and controller. A single node forms its
    quorum alone (`--standalone`); several form one quorum of all of them, with topics
    replicated across them (see StackLayout.kafka_replication_factor)."""

    node_id: int = 1
    node: KafkaNode = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.node_id <= self.layout.kafka_brokers:
            raise ValueError(f"no Kafka node {self.node_id} in a stack of {self.layout.kafka_brokers}")
        self.node = self.layout.kafka_nodes[self.node_id - 1]
        self.name = self.node.name

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def ports(self) -> list[int]:
        return [self.node.port, self.node.controller_port]

    @property
    def data_dir(self) -> Path:
        return self.layout.data(self.name)

    @property
    def single(self) -> bool:
        return self.layout.kafka_brokers == 1

    def config_file(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        node = self.node
        if self.single:
            quorum = f"controller.quorum.bootstrap.servers={node.controller_address}"
        else:
            voters = ",".join(f"{n.node_id}@{n.controller_address}" for n in self.layout.kafka_nodes)
            quorum = f"controller.quorum.voters={voters}"
        replicas = self.layout.kafka_replication_factor
        min_isr = self.layout.kafka_min_insync_replicas
        path = self.data_dir / "server.properties"
        path.write_text(f"""\
process.roles=broker,controller
node.id={node.node_id}
{quorum}
listeners=PLAINTEXT://{node.address},CONTROLLER://{node.controller_address}
advertised.listeners=PLAINTEXT://{node.address}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={self.data_dir / "logs"}
num.partitions=4
# Topics are created on purpose (Connect's topic.creation, the consumer's DLQ), never by a typo.
auto.create.topics.enable=false
default.replication.factor={replicas}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replicas}
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
message.max.bytes=10485760
""")
        return path

    def _classpath(self) -> str:
        return str(self.layout.lib / "kafka" / "*")

    def _meta(self, node_name: str) -> Path:
        return self.layout.data(node_name) / "logs" / "meta.properties"

    def _cluster_id(self) -> str:
        """Every node of one cluster is formatted with the same id: a formatted sibling's, if any."""
        for node in self.layout.kafka_nodes:
            meta = self._meta(node.name)
            if meta.exists():
                for line in meta.read_text().splitlines():
                    if line.startswith("cluster.id="):
                        return line.split("=", 1)[1].strip()
        return uuid.uuid4().hex[:22]

    def start(self) -> None:
        properties = self.config_file()
        if not self._meta(self.name).exists():
            subprocess.run(
                [
                    _java(JAVA17),
                    "-cp",
                    self._classpath(),
                    f"-Dlog4j2.configurationFile={self._log4j2()}",
                    "kafka.tools.StorageTool",
                    "format",
                    *(["--standalone"] if self.single else []),
                    "-t",
                    self._cluster_id(),
                    "-c",
                    str(properties),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        # Several brokers share the machine: each gets half the heap a single one has.
        heap = ["-Xms256m", "-Xmx768m"] if self.single else ["-Xms128m", "-Xmx384m"]
        self._spawn(
            [
                _java(JAVA17),
                *heap,
                "-XX:+UseG1GC",
                f"-Dlog4j2.configurationFile={self._log4j2()}",
                "-cp",
                self._classpath(),
                "kafka.Kafka",
                str(properties),
            ]
        )

    def stop(self) -> bool:
        # The last node of a quorum cannot finish a controlled shutdown (no controller majority
        # is left to grant it), so waiting the usual time for it would only delay the SIGKILL.
        alone = not self.single and not any(
            process.read_pid(self.layout.pidfile(node.name)) for node in self.layout.kafka_nodes if node != self.node
        )
        if alone:
            return process.stop(self.layout.pidfile(self.name), timeout=LAST_QUORUM_NODE_STOP_S)
        return super().stop()

    def healthy(self) -> bool:
        if not process.port_open(self.node.port):
            return False
        from confluent_kafka.admin import AdminClient

        try:
            metadata = AdminClient({"bootstrap.servers": self.address}).list_topics(timeout=3)
        except Exception:
            return False
        # Listed once it has registered with the controllers and is no longer fenced.
        return self.node.node_id in metadata.brokers


@dataclass
class KafkaConnect(Component):
    """A distributed Kafka Connect worker with Debezium and the Avro converter on its plugin path."""

    name: str = "connect"
    start_timeout: float = 180.0

    @property
    def address(self) -> str:
        return self.layout.connect_url

    @property
    def ports(self) -> list[int]:
        return [self.layout.ports.connect_port]

    def _properties(self) -> Path:
        data = self.layout.data("connect")
        data.mkdir(parents=True, exist_ok=True)
        path = data / "connect-distributed.properties"
        path.write_text(f"""\
bootstrap.servers={self.layout.kafka_bootstrap}
group.id=cdc-connect
listeners=http://{HOST}:{self.layout.ports.connect_port}
rest.advertised.host.name={HOST}
rest.advertised.port={self.layout.ports.connect_port}
plugin.path={self.layout.lib / "connect-plugins"}
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
config.storage.topic=_connect-configs
offset.storage.topic=_connect-offsets
status.storage.topic=_connect-status
config.storage.replication.factor={self.layout.kafka_replication_factor}
offset.storage.replication.factor={self.layout.kafka_replication_factor}
status.storage.replication.factor={self.layout.kafka_replication_factor}
offset.flush.interval.ms=1000
# Source offsets commit in the same Kafka transaction as the records (KIP-618): a worker
# crash neither loses nor re-emits a change, so consumers see each change exactly once.
exactly.once.source.support=enabled
# Credentials and addresses reach connector configs as ${{env:...}}, never stored in them.
config.providers=env
config.providers.env.class=org.apache.kafka.common.config.provider.EnvVarConfigProvider
""")
        return path

    def worker_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CDC_SOURCE_DB_HOST": HOST,
            "CDC_SOURCE_DB_PORT": str(self.layout.ports.postgres_port),
            "CDC_SOURCE_DB_NAME": "adtech",
            "CDC_SOURCE_DB_USER": SOURCE_DB_USER,
            "CDC_SOURCE_DB_PASSWORD": SOURCE_DB_PASSWORD,
            "CDC_SCHEMA_REGISTRY_URL": self.layout.schema_registry_url,
        }

    def start(self) -> None:
        properties = self._properties()
        self._spawn(
            [
                _java(JAVA17),
                "-Xms256m",
                "-Xmx1g",
                "-XX:+UseG1GC",
                f"-Dlog4j2.configurationFile={self._log4j2()}",
                "-cp",
                str(self.layout.lib / "kafka" / "*"),
                "org.apache.kafka.connect.cli.ConnectDistributed",
                str(properties),
            ],
            env=self.worker_env(),
        )

    def healthy(self) -> bool:
        return _http_ok(f"{self.address}/connectors")


@dataclass
class SchemaRegistry(Component):
    """Apicurio Registry 3 (Confluent-compatible API under /apis/ccompat/v7)."""

    name: str = "registry"

    @property
    def address(self) -> str:
        return self.layout.schema_registry_url

    @property
    def ports(self) -> list[int]:
        return [self.layout.ports.registry_port, self.layout.ports.registry_management_port]

    def start(self) -> None:
        data = self.layout.data("registry")
        data.mkdir(parents=True, exist_ok=True)
        p = self.layout.ports
        # H2 in a file rather than in memory: Kafka keeps its topics across `stack down`/`up`,
        # so the schema ids inside those messages must survive a registry restart too.
        self._spawn(
            [
                _java(java_home_for_registry()),
                "-Xms128m",
                "-Xmx512m",
                f"-Dquarkus.http.host={HOST}",
                f"-Dquarkus.http.port={p.registry_port}",
                f"-Dquarkus.management.host={HOST}",
                f"-Dquarkus.management.port={p.registry_management_port}",
                f"-Dapicurio.datasource.url=jdbc:h2:file:{data / 'registry'}",
                "-jar",
                str(self.layout.lib / "apicurio" / "quarkus-run.jar"),
            ],
            cwd=data,
        )

    def healthy(self) -> bool:
        return _http_ok(f"{self.address}/subjects")


@dataclass
class ClickHouse(Component):
    """ClickHouse 26.9 from PyPI's chdb-core, served on HTTP and TCP (see clickhouse_server).
    Every node declares the cluster `cdc` of all nodes, one shard each."""

    shard: int = 1
    node: ClickHouseNode = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.shard <= self.layout.clickhouse_shards:
            raise ValueError(f"no ClickHouse shard {self.shard} in a stack of {self.layout.clickhouse_shards}")
        self.node = self.layout.clickhouse_nodes[self.shard - 1]
        self.name = self.node.name

    @property
    def address(self) -> str:
        return self.node.url

    @property
    def ports(self) -> list[int]:
        return [self.node.http_port, self.node.tcp_port]

    def start(self) -> None:
        shards = [arg for node in self.layout.clickhouse_nodes for arg in ("--shard", f"{HOST}:{node.tcp_port}")]
        self._spawn(
            [
                sys.executable,
                "-m",
                "cdc_dev.stack.clickhouse_server",
                "--data-dir",
                str(self.layout.data(self.name)),
                "--http-port",
                str(self.node.http_port),
                "--tcp-port",
                str(self.node.tcp_port),
                "--cluster",
                CLICKHOUSE_CLUSTER,
                *shards,
            ]
        )

    def healthy(self) -> bool:
        return _http_ok(f"{self.address}/ping")


@dataclass
class Prometheus(Component):
    """Prometheus from Debian's package, scraping the consumer's /metrics."""

    name: str = "prometheus"

    @property
    def address(self) -> str:
        return self.layout.prometheus_url

    @property
    def ports(self) -> list[int]:
        return [self.layout.ports.prometheus_port]

    def config_file(self) -> Path:
        data = self.layout.data("prometheus")
        data.mkdir(parents=True, exist_ok=True)
        path = data / "prometheus.yml"
        rules = REPO_ROOT / "dashboards" / "alerts.yml"
        rule_files = f"rule_files:\n  - {rules}\n" if rules.exists() else ""
        path.write_text(f"""\
global:
  scrape_interval: 5s
  evaluation_interval: 5s
{rule_files}scrape_configs:
  - job_name: cdc-consumer
    static_configs:
      - targets: ["{HOST}:{self.layout.ports.metrics_port}"]
  - job_name: cdc-lag-exporter
    static_configs:
      - targets: ["{HOST}:{self.layout.ports.lag_exporter_port}"]
  - job_name: cdc-audit
    static_configs:
      - targets: ["{HOST}:{self.layout.ports.audit_exporter_port}"]
""")
        return path

    def start(self) -> None:
        data = self.layout.data("prometheus")
        self._spawn(
            [
                "/usr/bin/prometheus",
                f"--config.file={self.config_file()}",
                f"--storage.tsdb.path={data / 'tsdb'}",
                f"--web.listen-address={HOST}:{self.layout.ports.prometheus_port}",
                "--web.enable-lifecycle",
            ]
        )

    def healthy(self) -> bool:
        return _http_ok(f"{self.address}/-/ready")


def all_components(layout: StackLayout) -> list[Component]:
    """In start order: Connect needs Kafka; the connector needs Postgres, Connect and the registry."""
    return [
        Postgres(layout),
        *(Kafka(layout, node_id=node.node_id) for node in layout.kafka_nodes),
        SchemaRegistry(layout),
        *(ClickHouse(layout, shard=node.shard) for node in layout.clickhouse_nodes),
        Prometheus(layout),
        KafkaConnect(layout),
    ]
