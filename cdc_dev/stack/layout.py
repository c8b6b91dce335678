"""Where the native stack lives on disk and which loopback ports it takes.

Everything the stack writes (downloads, data, logs, pid files) stays under one state
directory, `.stack/` in the working directory unless `CDC_STACK_DIR` says otherwise.
Ports come from `CDC_STACK_<PART>_PORT` environment variables with defaults chosen
away from the well-known ports, so the stack runs beside a developer's own services.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


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


@dataclass(frozen=True)
class StackLayout:
    root: Path
    ports: StackPorts

    @classmethod
    def from_env(cls) -> StackLayout:
        """`CDC_STACK_DIR` and per-port variables; `CDC_STACK_PORT_OFFSET` shifts every default
        port at once, so a second stack (a colleague's, a test's) runs beside the first."""
        root = Path(os.environ.get("CDC_STACK_DIR", ".stack")).resolve()
        offset = int(os.environ.get("CDC_STACK_PORT_OFFSET", "0"))
        shifted = {name: field.default + offset for name, field in StackPorts.model_fields.items()}
        return cls(root=root, ports=StackPorts(**{**shifted, **StackPorts().model_dump(exclude_defaults=True)}))

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
        return self.root / "data" / component

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pidfile(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    # Connection settings the rest of the project reads (`cdc-consumer stack env`).
    @property
    def postgres_dsn(self) -> str:
        return f"postgresql://cdc:cdc@{HOST}:{self.ports.postgres_port}/adtech"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{HOST}:{self.ports.kafka_port}"

    @property
    def connect_url(self) -> str:
        return f"http://{HOST}:{self.ports.connect_port}"

    @property
    def schema_registry_url(self) -> str:
        return f"http://{HOST}:{self.ports.registry_port}/apis/ccompat/v7"

    @property
    def clickhouse_url(self) -> str:
        return f"http://{HOST}:{self.ports.clickhouse_http_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{HOST}:{self.ports.prometheus_port}"

    def connection_env(self) -> dict[str, str]:
        return {
            "CDC_POSTGRES_DSN": self.postgres_dsn,
            "CDC_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CDC_CONNECT_URL": self.connect_url,
            "CDC_SCHEMA_REGISTRY_URL": self.schema_registry_url,
            "CDC_CLICKHOUSE_URL": self.clickhouse_url,
            "CDC_PROMETHEUS_URL": self.prometheus_url,
        }
