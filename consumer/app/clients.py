"""The registry and ClickHouse clients, built from the settings: one place each, so every command
connects the way `cdc-consumer run` does (credentials, TLS). Kafka's:
:func:`consumer.kafka.client_config.kafka_client_config`."""

from __future__ import annotations

from consumer.decode.registry import SchemaRegistry
from consumer.settings import ConfigError, Settings


def schema_registry(settings: Settings) -> SchemaRegistry | None:
    if not settings.schema_registry_url:
        return None
    return SchemaRegistry(
        settings.schema_registry_url,
        user=settings.schema_registry_user,
        password=settings.schema_registry_password,
        token=settings.schema_registry_token,
        ca_cert=settings.schema_registry_ca_cert,
    )


def clickhouse_client(settings: Settings):
    from consumer.sink.clickhouse import connect

    try:
        return connect(
            settings.clickhouse_url,
            settings.clickhouse_embedded_path,
            compress=settings.clickhouse_compress,
            user=settings.clickhouse_user,
            password=settings.clickhouse_password,
            ca_cert=settings.clickhouse_ca_cert,
            client_cert=settings.clickhouse_client_cert,
            client_key=settings.clickhouse_client_key,
            verify=settings.clickhouse_verify,
        )
    except ValueError as exc:  # a URL that is not http(s); the message is redacted
        raise ConfigError(str(exc)) from None
