"""One place where tests get every address of the stack they run against.

`--stack=native` (default) starts the project's own native stack (idempotent: an already
running one is reused) and stops it at the end if this session started it.
`--stack=docker` runs the same tests on docker-compose.yml through testcontainers, where a
Docker engine exists.

With `CDC_STACK_SECURE=1` the native stack is the secured one: the endpoints then carry its
credentials and CA (`kafka`, `clickhouse()`, `ca`), and `-m secure` selects the tests that CI
runs there too (the core end-to-end ones and tests/test_secure_stack.py).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cdc_dev.stack.layout import REPO_ROOT, StackLayout


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stack",
        choices=["native", "docker"],
        default="native",
        help="which stack the tests run against (default: native)",
    )
    parser.addoption(
        "--keep-stack", action="store_true", help="leave a stack this session started running (for debugging)"
    )


@dataclass(frozen=True)
class StackEndpoints:
    postgres_dsn: str
    kafka_bootstrap: str
    connect_url: str
    schema_registry_url: str
    clickhouse_url: str
    prometheus_url: str
    layout: StackLayout | None  # None on docker: no native process control
    # The secured stack's extra connection settings (`stack env`): credentials and CA.
    security_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def native(cls, layout: StackLayout) -> StackEndpoints:
        endpoints = cls(
            postgres_dsn=layout.postgres_dsn,
            kafka_bootstrap=layout.kafka_bootstrap,
            connect_url=layout.connect_url,
            schema_registry_url=layout.schema_registry_url,
            clickhouse_url=layout.clickhouse_url,
            prometheus_url=layout.prometheus_url,
            layout=layout,
        )
        if not layout.secure:
            return endpoints
        plain = endpoints.env()
        security = {k: v for k, v in layout.connection_env().items() if k not in plain}
        return dataclasses.replace(endpoints, security_env=security)

    def env(self) -> dict[str, str]:
        return {
            "CDC_POSTGRES_DSN": self.postgres_dsn,
            "CDC_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CDC_CONNECT_URL": self.connect_url,
            "CDC_SCHEMA_REGISTRY_URL": self.schema_registry_url,
            "CDC_CLICKHOUSE_URL": self.clickhouse_url,
            "CDC_PROMETHEUS_URL": self.prometheus_url,
            **self.security_env,
        }

    @property
    def secure(self) -> bool:
        return bool(self.security_env)

    @property
    def ca(self) -> str | None:
        """The CA file the secured stack's servers are verified with (None: plain stack)."""
        return self.security_env.get("CDC_CLICKHOUSE_CA_CERT")

    @property
    def kafka(self) -> dict[str, str]:
        """librdkafka properties of a client of this stack; add a client's own to a copy."""
        if self.layout is not None:
            return self.layout.kafka_client_properties()
        return {"bootstrap.servers": self.kafka_bootstrap}

    def clickhouse(self, database: str | None = None):
        """A ClickHouse client with this stack's credentials, on `database` if given."""
        from consumer.sink.clickhouse import connect

        url = f"{self.clickhouse_url}/{database}" if database else self.clickhouse_url
        return connect(
            url,
            user=self.security_env.get("CDC_CLICKHOUSE_USER"),
            password=self.security_env.get("CDC_CLICKHOUSE_PASSWORD"),
            ca_cert=Path(self.ca) if self.ca else None,
        )


def _docker_engine_error() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on this machine"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"no Docker engine reachable (`docker info`: {probe.stderr.strip().splitlines()[-1:]})"
    return None


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[StackEndpoints]:
    if request.config.getoption("--stack") == "docker":
        yield from _docker_stack()
        return
    from cdc_dev.stack import manager

    layout = StackLayout.from_env()
    already_running = all(s.healthy for s in manager.status(layout))
    manager.up(layout)
    endpoints = StackEndpoints.native(layout)
    os.environ.update(endpoints.env())
    try:
        yield endpoints
    finally:
        if not already_running and not request.config.getoption("--keep-stack"):
            manager.down(layout)


def _docker_stack() -> Iterator[StackEndpoints]:
    reason = _docker_engine_error()
    if reason:
        pytest.skip(f"--stack=docker: {reason}")
    from testcontainers.compose import DockerCompose

    with DockerCompose(str(REPO_ROOT), compose_file_name="docker-compose.yml", wait=True) as compose:

        def url(service: str, port: int) -> str:
            return f"{compose.get_service_host(service, port)}:{compose.get_service_port(service, port)}"

        yield StackEndpoints(
            postgres_dsn=f"postgresql://cdc:cdc@{url('postgres', 5432)}/adtech",
            kafka_bootstrap=url("kafka", 9092),
            connect_url=f"http://{url('connect', 8083)}",
            schema_registry_url=f"http://{url('registry', 8080)}/apis/ccompat/v7",
            clickhouse_url=f"http://{url('clickhouse', 8123)}",
            prometheus_url=f"http://{url('prometheus', 9090)}",
            layout=None,
        )


@pytest.fixture(scope="session", autouse=True)
def _stack_for_marked_tests(request: pytest.FixtureRequest) -> None:
    """Tests marked `stack` get the stack (and its CDC_* variables) before their own fixtures run."""
    if any(item.get_closest_marker("stack") for item in request.session.items):
        request.getfixturevalue("stack")


@pytest.fixture
def native_stack(stack: StackEndpoints) -> StackLayout:
    """For tests that stop and start processes of the stack themselves."""
    if stack.layout is None:
        pytest.skip("needs the native stack's process control")
    return stack.layout


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return Path(__file__).parent / "fixtures"


@pytest.fixture
def clickhouse(stack):
    """A client of a fresh database with the consumer's tables, dropped afterwards."""
    import uuid

    from consumer.sink.migrate import apply_migrations

    database = f"test_db_{uuid.uuid4().hex[:8]}"
    admin = stack.clickhouse()
    client = stack.clickhouse(database)  # creates it
    apply_migrations(client)
    try:
        yield client
    finally:
        admin.command(f"DROP DATABASE IF EXISTS {database}")
