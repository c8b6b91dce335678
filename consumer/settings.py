"""Typed configuration: a TOML file (`--config` or `CDC_CONFIG`) overlaid by `CDC_*` environment variables.

Environment variables win over the file, so a deployment can keep one file and change a
setting per instance. Invalid values fail at start with the setting's name and the reason.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ConfigError(RuntimeError):
    pass


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDC_", extra="forbid")

    postgres_dsn: str | None = None
    kafka_bootstrap: str | None = None
    connect_url: str | None = None
    schema_registry_url: str | None = None
    clickhouse_url: str | None = None
    # LZ4 on the HTTP inserts and results: for a ClickHouse across a slow network (costs CPU).
    clickhouse_compress: bool = False
    prometheus_url: str | None = None

    # The consumer (`cdc-consumer run`)
    group_id: str = "cdc-consumer"
    # Static group membership (Kafka's group.instance.id), e.g. the pod or host name: a member that
    # restarts within the session timeout gets its partitions back at once, without a rebalance —
    # after a crash, a dynamic member's partitions wait for the session timeout instead.
    group_instance_id: str | None = None
    session_timeout_ms: int = Field(45_000, ge=1_000)
    # Crash-only watchdog: exit (code 70) when the consumer loop has not come round for this long,
    # so the supervisor (systemd Restart=always, an orchestrator) starts it afresh; 0 disables.
    stall_exit_s: float = Field(300.0, ge=0)
    topic_prefix: str = "adtech"
    mapping_file: Path | None = None
    dlq_topic: str = "cdc-consumer.dlq"
    clickhouse_embedded_path: Path = Path(".cdc-clickhouse")
    batch_max_rows: int = Field(200_000, gt=0)
    batch_max_bytes: int = Field(64 * 2**20, gt=0)
    batch_max_age_s: float = Field(0.5, gt=0)
    # Caught up, write a batch at once instead of waiting out its age (consumer.engine.batch).
    flush_when_caught_up: bool = True
    min_insert_interval_s: float = Field(0.2, ge=0)
    poll_max_messages: int = Field(10_000, gt=0)
    metrics_port: int = Field(19108, ge=0, le=65535)
    # A TRUNCATE in Postgres: "dlq" sends the event to the dead-letter topic for an operator to act
    # on (the default: ClickHouse keeps its rows); "skip" logs and ignores it.
    truncate_action: Literal["dlq", "skip"] = "dlq"
    # Fact batches decoded and mapped by ClickHouse (INSERT … FORMAT Avro into a staging table
    # whose materialized view writes the rows): ~10x less CPU than decoding in Python.
    server_decode: bool = True
    # Per dimension partition, the rows last applied, by key: a change's unchanged (TOASTed)
    # columns come from there instead of a ClickHouse look-up. 0: always ask ClickHouse.
    latest_rows_kept: int = Field(10_000, ge=0)
    # ... and at most this many bytes of them per partition (the rows carry the TOASTed values).
    latest_rows_max_bytes: int = Field(32 * 2**20, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("CDC_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise ConfigError(f"CDC_CONFIG={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])} (CDC_{str(err['loc'][0]).upper()}): {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return load_settings()


def require(name: str) -> str:
    value = getattr(_cached(), name)
    if not value:
        raise ConfigError(f'CDC_{name.upper()} is not set; for the native stack run: eval "$(cdc-consumer stack env)"')
    return value
