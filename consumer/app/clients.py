"""The registry and ClickHouse clients, built from the settings: one place each, so every command
connects the way `cdc-consumer run` does (credentials, TLS). Kafka's:
:func:`consumer.kafka.client_config.kafka_client_config`."""

from __future__ import annotations

import logging

from consumer.decode.registry import SchemaRegistry
from consumer.settings import ConfigError, Settings

log = logging.getLogger(__name__)


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


def clickhouse_client(settings: Settings, url: str | None = None):
    """A client for `url`, by default CDC_CLICKHOUSE_URL, else the first shard of a cluster (its
    Distributed tables and views show every shard), else the embedded ClickHouse."""
    from consumer.sink.clickhouse import connect

    try:
        return connect(
            url or settings.clickhouse_url or next(iter(settings.shard_urls), None),
            settings.clickhouse_embedded_path,
            compress=settings.clickhouse_compress,
            user=settings.clickhouse_user,
            password=settings.clickhouse_password,
            ca_cert=settings.clickhouse_ca_cert,
            client_cert=settings.clickhouse_client_cert,
            client_key=settings.clickhouse_client_key,
            verify=settings.clickhouse_verify,
            timeout_s=settings.clickhouse_timeout_s,
        )
    except ValueError as exc:  # a URL that is not http(s); the message is redacted
        raise ConfigError(str(exc)) from None


def clickhouse_nodes(settings: Settings):
    """A client per shard and the cluster's layout: one server (layout None), or the cluster of
    CDC_CLICKHOUSE_CLUSTER, checked against its own remote_servers."""
    from consumer.sink.cluster_ddl import ClusterLayout
    from consumer.sink.shards import check_cluster

    if not settings.clickhouse_cluster:
        return [clickhouse_client(settings)], None
    clients = [clickhouse_client(settings, url) for url in settings.shard_urls]
    layout = ClusterLayout(settings.clickhouse_cluster, settings.clickhouse_replicated)
    check_cluster(clients, layout.name)
    return clients, layout


def clickhouse_shards(settings: Settings):
    """The sinks of every shard (consumer.sink.shards), their migrations applied."""
    from consumer.sink.clickhouse import ClickHouseSink
    from consumer.sink.migrate import apply_to_shards
    from consumer.sink.shards import Shards

    clients, layout = clickhouse_nodes(settings)
    applied = apply_to_shards(clients, layout)
    if applied:
        log.info("applied ClickHouse migrations: %s", ", ".join(applied))
    return Shards([ClickHouseSink(client, local=layout is not None) for client in clients])
