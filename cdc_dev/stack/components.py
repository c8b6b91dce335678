"""The parts of the native stack: how each one is configured, started and probed.

Every part binds loopback only, keeps its data under `<state>/data/<part>`, logs to
`<state>/logs/<part>.log` and is tracked by `<state>/run/<part>.pid`, so `stack down`
stops exactly what `stack up` started.

The secured variant (`CDC_STACK_SECURE=1`, layout.secure) changes each part's listeners:
Kafka's client and inter-broker listener is SASL_SSL with SCRAM-SHA-512 only (the KRaft
controller listener stays plaintext on loopback); Postgres takes TLS connections only, with
scram-sha-256 passwords; the registry serves HTTPS only; ClickHouse sits behind a TLS proxy
(ClickHouseTls) on its usual ports. Connect and Debezium are clients like any other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import requests

from cdc_dev.stack import process
from cdc_dev.stack.install import SECURE_DEBIAN_PACKAGES, java_home_for_registry
from cdc_dev.stack.layout import (
    CLICKHOUSE_CLUSTER,
    CLIENT_USER,
    HOST,
    REPO_ROOT,
    ClickHouseNode,
    KafkaNode,
    StackLayout,
)
from cdc_dev.stack.security import write_private

log = logging.getLogger(__name__)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
JAVA17 = Path(os.environ.get("CDC_JAVA_HOME", "/usr/lib/jvm/java-17-openjdk-amd64"))
SOURCE_DB_USER = CLIENT_USER
LAST_QUORUM_NODE_STOP_S = 5.0
SCRAM = "SCRAM-SHA-512"
# Kafka's SCRAM users in the secured stack: the brokers among themselves, the Connect worker
# (Debezium's records included), and every other client.
KAFKA_USERS = ("broker", "connect", CLIENT_USER)
# The only variables the Connect worker's environment holds: what a JVM needs, and what the
# connector configurations reference as ${env:...} (the config provider allows no others).
CONNECT_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
CONNECT_ENV_ALLOWLIST = r"CDC_SOURCE_DB_[A-Z]+|CDC_SCHEMA_REGISTRY_URL"

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


def _http_ok(url: str, ca: Path | None = None) -> bool:
    try:
        return requests.get(url, timeout=2, verify=str(ca) if ca else True).status_code == 200
    except requests.RequestException:
        return False


def _jaas(user: str, password: str) -> str:
    return f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{user}" password="{password}";'


def _java_client_security(layout: StackLayout, user: str) -> str:
    """The properties of a Java Kafka client of the secured stack, logging in as `user`."""
    tls = layout.certificates()
    return f"""\
security.protocol=SASL_SSL
sasl.mechanism={SCRAM}
sasl.jaas.config={_jaas(user, layout.secret(f"kafka-{user}"))}
ssl.truststore.type=PKCS12
ssl.truststore.location={tls.truststore}
ssl.truststore.password={tls.store_password}
"""


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
        """Private to the user the server runs as (the `postgres` user under root, else us)."""
        path.mkdir(parents=True, exist_ok=True)
        if self.os_user:
            _allow_traverse(path.parent)
            entry = pwd.getpwnam(self.os_user)
            shutil.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o700)

    @property
    def superuser_password(self) -> str:
        return self.layout.secret("postgres-superuser")

    @property
    def pgpass(self) -> Path:
        """The passwords of the stack's own tools (psql as `postgres` and as `cdc`), libpq's way."""
        path = self.layout.root / "secrets" / "pgpass"
        write_private(
            path,
            f"*:*:*:postgres:{self.superuser_password}\n*:*:*:{SOURCE_DB_USER}:{self.layout.client_password('postgres')}\n",
        )
        return path

    def _hba(self) -> str:
        """Every connection needs a password, local ones too; the secured stack takes TCP
        connections only over TLS (no `host` line matches one without, so it is refused)."""
        network = "hostssl" if self.layout.secure else "host"
        return (
            "local all all scram-sha-256\n"
            f"{network} all all {HOST}/32 scram-sha-256\n"
            f"{network} replication all {HOST}/32 scram-sha-256\n"
        )

    def _set_superuser_password(self) -> None:
        """Give `postgres` the stack's superuser password, in single-user mode (no connection,
        so no authentication needed) — once per password: a marker keeps its digest."""
        digest = hashlib.sha256(self.superuser_password.encode()).hexdigest()
        marker = self.data_dir / "cdc-stack-superuser.sha256"
        if marker.exists() and marker.read_text().strip() == digest:
            return
        subprocess.run(
            # wal_level as the server runs: a data directory holding a logical slot refuses to start below it.
            [str(PG_BIN / "postgres"), "--single", "-D", str(self.data_dir), "-c", "wal_level=logical", "postgres"],
            input=f"ALTER ROLE postgres PASSWORD '{self.superuser_password}';\n",
            text=True,
            check=True,
            stdout=subprocess.DEVNULL,
            cwd="/",
            **self._identity(),
        )
        marker.write_text(digest)

    def _install_certificate(self) -> list[str]:
        """The server's key and certificate, copied where only the server's user reads them
        (Postgres refuses a key others can read)."""
        tls = self.layout.certificates()
        settings = []
        for source, name, setting in (
            (tls.server_cert, "server.crt", "ssl_cert_file"),
            (tls.server_key, "server.key", "ssl_key_file"),
        ):
            target = self.data_dir / name
            shutil.copyfile(source, target)
            self._own_file(target)
            settings += ["-c", f"{setting}={target}"]
        return ["-c", "ssl=on", *settings]

    def _own_file(self, path: Path) -> None:
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            shutil.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o600)

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
                    # Replaced below, before the server first starts, by the stack's pg_hba.conf.
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                cwd="/",
                **self._identity(),
            )
        self._set_superuser_password()
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(self._hba())
        self._own_file(hba)
        tls = self._install_certificate() if self.layout.secure else []
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
                *tls,
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
        """The statements' output; a failure says what psql said (string literals masked: they may
        hold a password), not only its exit code."""
        done = subprocess.run(
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
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, "PGPASSFILE": str(self.pgpass)},
        )
        if done.returncode != 0:
            said = re.sub(r"'(?:[^']|'')*'", "'***'", done.stderr.strip())[-2000:]
            raise RuntimeError(f"psql as {user} on {database} exited with {done.returncode}: {said}")
        return done.stdout

    def provision(self) -> None:
        """The `cdc` role (owner of the source tables, allowed to replicate) and the schema."""
        password = self.layout.client_password("postgres")
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{SOURCE_DB_USER}'").strip():
            self.psql(f"CREATE ROLE {SOURCE_DB_USER} LOGIN REPLICATION CREATEDB PASSWORD '{password}'")
        else:
            self.psql(f"ALTER ROLE {SOURCE_DB_USER} PASSWORD '{password}'")
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
        listener = "SASL_SSL" if self.layout.secure else "PLAINTEXT"
        path = write_private(
            self.data_dir / "server.properties",
            f"""\
process.roles=broker,controller
node.id={node.node_id}
{quorum}
listeners={listener}://{node.address},CONTROLLER://{node.controller_address}
advertised.listeners={listener}://{node.address}
controller.listener.names=CONTROLLER
inter.broker.listener.name={listener}
{self._security()}log.dirs={self.data_dir / "logs"}
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
""",
        )
        return path

    def _security(self) -> str:
        """The secured stack's SASL_SSL listener: SCRAM-SHA-512 only, the brokers logging in to
        each other as `broker`. The controller listener stays plaintext on loopback (KRaft's
        quorum traffic; no client reaches it)."""
        if not self.layout.secure:
            return ""
        tls = self.layout.certificates()
        return f"""\
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms={SCRAM}
sasl.mechanism.inter.broker.protocol={SCRAM}
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={_jaas("broker", self.layout.secret("kafka-broker"))}
ssl.keystore.type=PKCS12
ssl.keystore.location={tls.keystore}
ssl.keystore.password={tls.store_password}
ssl.truststore.type=PKCS12
ssl.truststore.location={tls.truststore}
ssl.truststore.password={tls.store_password}
"""

    def _scram_users(self) -> list[str]:
        """`kafka-storage format --add-scram`: KRaft keeps SCRAM credentials in its metadata
        log, so the users exist from the cluster's first record on."""
        if not self.layout.secure:
            return []
        return [
            arg
            for user in KAFKA_USERS
            for arg in ("--add-scram", f"{SCRAM}=[name={user},password={self.layout.secret(f'kafka-{user}')}]")
        ]

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
                    *self._scram_users(),
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
            client = {**self.layout.kafka_client_properties(), "bootstrap.servers": self.address}
            metadata = AdminClient(client).list_topics(timeout=3)
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
        path = write_private(
            data / "connect-distributed.properties",
            f"""\
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
config.providers.env.param.allowlist.pattern={CONNECT_ENV_ALLOWLIST}
{self._security()}""",
        )
        return path

    def _security(self) -> str:
        """The worker's own clients and those it makes for connectors (producer., consumer.,
        admin.: Debezium's records, offsets and topic creation) all log in over SASL_SSL.
        The Postgres connector keeps no schema history topic, so nothing else needs them."""
        if not self.layout.secure:
            return ""
        security = _java_client_security(self.layout, "connect")
        return "".join(
            f"{prefix}{line}\n" for prefix in ("", "producer.", "consumer.", "admin.") for line in security.splitlines()
        )

    def worker_env(self) -> dict[str, str]:
        tls = self.layout.certificates() if self.layout.secure else None
        return {
            **{name: os.environ[name] for name in CONNECT_INHERITED_ENV if name in os.environ},
            "CDC_SOURCE_DB_HOST": HOST,
            "CDC_SOURCE_DB_PORT": str(self.layout.ports.postgres_port),
            "CDC_SOURCE_DB_NAME": "adtech",
            "CDC_SOURCE_DB_USER": SOURCE_DB_USER,
            "CDC_SOURCE_DB_PASSWORD": self.layout.client_password("postgres"),
            "CDC_SOURCE_DB_SSLMODE": "verify-full" if tls else "disable",
            "CDC_SOURCE_DB_SSLROOTCERT": str(tls.ca) if tls else "",
            "CDC_SCHEMA_REGISTRY_URL": self.layout.schema_registry_url,
        }

    def _jvm_trust(self) -> list[str]:
        """The Avro converter reaches the HTTPS registry with the JVM's default trust store (its
        password on the command line guards nothing secret: the store holds the CA certificate)."""
        if not self.layout.secure:
            return []
        tls = self.layout.certificates()
        return [
            f"-Djavax.net.ssl.trustStore={tls.truststore}",
            "-Djavax.net.ssl.trustStoreType=PKCS12",
            f"-Djavax.net.ssl.trustStorePassword={tls.store_password}",
        ]

    def start(self) -> None:
        properties = self._properties()
        self._spawn(
            [
                _java(JAVA17),
                "-Xms256m",
                "-Xmx1g",
                "-XX:+UseG1GC",
                *self._jvm_trust(),
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
                f"-Dquarkus.management.host={HOST}",
                f"-Dquarkus.management.port={p.registry_management_port}",
                *self._listeners(),
                f"-Dapicurio.datasource.url=jdbc:h2:file:{data / 'registry'}",
                "-jar",
                str(self.layout.lib / "apicurio" / "quarkus-run.jar"),
            ],
            cwd=data,
        )

    def _listeners(self) -> list[str]:
        """HTTP, or in the secured stack HTTPS only (the API and the management interface)."""
        port = self.layout.ports.registry_port
        if not self.layout.secure:
            return [f"-Dquarkus.http.port={port}"]
        tls = self.layout.certificates()
        return [
            f"-Dquarkus.http.ssl-port={port}",
            "-Dquarkus.http.insecure-requests=disabled",
            f"-Dquarkus.http.ssl.certificate.files={tls.server_cert}",
            f"-Dquarkus.http.ssl.certificate.key-files={tls.server_key}",
            f"-Dquarkus.management.ssl.certificate.files={tls.server_cert}",
            f"-Dquarkus.management.ssl.certificate.key-files={tls.server_key}",
        ]

    def healthy(self) -> bool:
        return _http_ok(f"{self.address}/subjects", self.layout.certificates().ca if self.layout.secure else None)


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
        return f"http://{HOST}:{self.node.server_http_port}"

    @property
    def ports(self) -> list[int]:
        return [self.node.server_http_port, self.node.server_tcp_port]

    def start(self) -> None:
        shards = [arg for node in self.layout.clickhouse_nodes for arg in ("--shard", f"{HOST}:{node.server_tcp_port}")]
        data = self.layout.data(self.name)
        users = []
        if self.layout.secure:
            data.mkdir(parents=True, exist_ok=True)
            password = write_private(data / "client-password", self.layout.client_password("clickhouse"))
            users = ["--client-user", CLIENT_USER, "--client-password-file", str(password)]
        self._spawn(
            [
                sys.executable,
                "-m",
                "cdc_dev.stack.clickhouse_server",
                "--data-dir",
                str(data),
                "--http-port",
                str(self.node.server_http_port),
                "--tcp-port",
                str(self.node.server_tcp_port),
                "--cluster",
                CLICKHOUSE_CLUSTER,
                *shards,
                *users,
            ]
        )

    def healthy(self) -> bool:
        return _http_ok(f"{self.address}/ping")


# A client address no machine has (TEST-NET-1, RFC 5737): the TLS proxy puts it in every HTTP
# request's X-Forwarded-For, and ClickHouse (auth_use_forwarded_address) checks users' networks
# against it. So `default`, whose networks are local only, is refused through the proxy.
PROXIED_CLIENT_ADDRESS = "192.0.2.1"


@dataclass
class ClickHouseTls(Component):
    """haproxy in front of the secured stack's ClickHouse nodes: each node's usual HTTP port
    serves HTTPS and its native TCP port native-over-TLS, both passed on to the node's loopback
    ports (ClickHouseNode.server_*_port). chdb-core's server starts only plain HTTP and TCP
    listeners, so TLS has to end in front of it.

    Passwords: the serving process's own in-process session logs in as `default` without a
    password (chdb cannot give it one), and ClickHouse treats every loopback client as local.
    So `default` may do nothing but start listeners (clickhouse_server's users.xml), HTTP
    requests through the proxy carry PROXIED_CLIENT_ADDRESS, and on the native port the proxy
    lets through only a Hello that names `cdc` with its password."""

    name: str = "clickhouse-tls"

    @property
    def address(self) -> str:
        return self.layout.clickhouse_url

    @property
    def ports(self) -> list[int]:
        return [port for node in self.layout.clickhouse_nodes for port in (node.http_port, node.tcp_port)]

    def config_file(self) -> Path:
        data = self.layout.data(self.name)
        data.mkdir(parents=True, exist_ok=True)
        bundle = self.layout.certificates().server_bundle
        hello = _native_hello_credentials(CLIENT_USER, self.layout.client_password("clickhouse"))
        sections = [
            """\
global
    maxconn 2048
defaults
    timeout connect 5s
    timeout client 15m
    timeout server 15m
"""
        ]
        for node in self.layout.clickhouse_nodes:
            sections.append(f"""\
frontend https_{node.shard}
    mode http
    bind {HOST}:{node.http_port} ssl crt {bundle}
    http-request set-header X-Forwarded-For {PROXIED_CLIENT_ADDRESS}
    default_backend http_{node.shard}
backend http_{node.shard}
    mode http
    server node {HOST}:{node.server_http_port}
frontend native_{node.shard}
    mode tcp
    bind {HOST}:{node.tcp_port} ssl crt {bundle}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.payload(0,0),hex -m sub {hello} }}
    tcp-request content reject if WAIT_END
    default_backend native_{node.shard}
backend native_{node.shard}
    mode tcp
    server node {HOST}:{node.server_tcp_port}
""")
        return write_private(data / "haproxy.cfg", "".join(sections))

    def start(self) -> None:
        self._spawn([str(SECURE_DEBIAN_PACKAGES["haproxy"]), "-db", "-f", str(self.config_file())])

    def healthy(self) -> bool:
        return _http_ok(f"{self.address}/ping", self.layout.certificates().ca)


def _native_hello_credentials(user: str, password: str) -> str:
    """The user and password fields of ClickHouse's native Hello packet, in hex (each a
    length-prefixed string, one after the other): present only if the client knows both."""

    def field(value: str) -> bytes:
        raw = value.encode()
        if len(raw) > 127:
            raise ValueError("a one-byte length prefix holds at most 127 bytes")
        return bytes([len(raw)]) + raw

    return (field(user) + field(password)).hex().upper()


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
        *([ClickHouseTls(layout)] if layout.secure else []),
        Prometheus(layout),
        KafkaConnect(layout),
    ]
