"""Typed configuration: a TOML file (`--config` or `CDC_CONFIG`) overlaid by `CDC_*` environment variables.

Environment variables win over the file, so a deployment can keep one file and change a
setting per instance. Invalid values fail at start with the setting's name and the reason.

Every secret (a `SecretStr` below: masked in any repr or log) can also come from a file named by
`<VARIABLE>_FILE`, e.g. `CDC_KAFKA_SASL_PASSWORD_FILE=/run/secrets/kafka-password` (the
Kubernetes and Docker secrets convention); giving both the variable and its file is an error.

Kafka client properties beyond the named ones pass through to librdkafka, to every client: from a
`[kafka]` table of the TOML file, from `CDC_KAFKA_PROPERTY__<NAME>` variables (the property's
name upper-cased, dots as underscores: `CDC_KAFKA_PROPERTY__SOCKET_KEEPALIVE_ENABLE=true`) or
from `CDC_KAFKA` as a JSON object.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from consumer.core.secrets import hide_password, redact_url

ENV_PREFIX = "CDC_"
SECRET_FILE_MAX_BYTES = 64 * 2**10
KAFKA_PROPERTY_PREFIX = "CDC_KAFKA_PROPERTY__"
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = ("SSL", "SASL_SSL")

# librdkafka properties with a setting of their own: the setting is the one place for them (and
# for the secrets among them, a SecretStr that a pass-through value is not).
NAMED_KAFKA_PROPERTIES = {
    "bootstrap.servers": "kafka_bootstrap",
    "metadata.broker.list": "kafka_bootstrap",
    "security.protocol": "kafka_security_protocol",
    "sasl.mechanism": "kafka_sasl_mechanism",
    "sasl.mechanisms": "kafka_sasl_mechanism",
    "sasl.username": "kafka_sasl_username",
    "sasl.password": "kafka_sasl_password",
    "sasl.oauthbearer.method": "kafka_sasl_oauthbearer_method",
    "sasl.oauthbearer.client.id": "kafka_sasl_oauthbearer_client_id",
    "sasl.oauthbearer.client.secret": "kafka_sasl_oauthbearer_client_secret",
    "sasl.oauthbearer.token.endpoint.url": "kafka_sasl_oauthbearer_token_endpoint_url",
    "sasl.oauthbearer.scope": "kafka_sasl_oauthbearer_scope",
    "ssl.ca.location": "kafka_ssl_ca_location",
    "ssl.certificate.location": "kafka_ssl_certificate_location",
    "ssl.key.location": "kafka_ssl_key_location",
    "ssl.key.password": "kafka_ssl_key_password",
}
_KAFKA_PROPERTY_NAME = re.compile(r"^[a-z][a-z0-9]*(\.[a-z0-9]+)*$")


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _property_value(value: Any) -> Any:
    """TOML gives booleans and numbers; librdkafka takes every value as a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


class ConfigError(RuntimeError):
    pass


class SecretFileSettingsSource(PydanticBaseSettingsSource):
    """`CDC_<SECRET>_FILE`: the secret is the file's content (a trailing newline dropped)."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        self.environ = {k.upper(): v for k, v in os.environ.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values = {}
        for name in secret_fields(self.settings_cls):
            variable = env_name(name)
            path = self.environ.get(f"{variable}_FILE")
            if path is None:
                continue
            if variable in self.environ:
                raise ConfigError(f"{variable} and {variable}_FILE are both set: give one")
            values[name] = read_secret_file(f"{variable}_FILE", Path(path))
        return values


def read_secret_file(variable: str, path: Path) -> str:
    try:
        with path.open("rb") as file:
            content = file.read(SECRET_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{variable}={path}: cannot read it ({exc.strerror})") from None
    if len(content) > SECRET_FILE_MAX_BYTES:
        raise ConfigError(f"{variable}={path}: larger than {SECRET_FILE_MAX_BYTES} bytes, not a secret")
    try:
        text = content.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}={path}: not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{variable}={path}: the file is empty")
    return text


class KafkaPropertySettingsSource(PydanticBaseSettingsSource):
    """`CDC_KAFKA_PROPERTY__<NAME>=value`: one librdkafka property (dots written as underscores)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        properties = {
            key[len(KAFKA_PROPERTY_PREFIX) :].lower().replace("_", "."): value
            for key, value in os.environ.items()
            if key.upper().startswith(KAFKA_PROPERTY_PREFIX)
        }
        return {"kafka": properties} if properties else {}


def secret_fields(settings_cls: type[BaseSettings]) -> list[str]:
    return [name for name, field in settings_cls.model_fields.items() if field.annotation == SecretStr | None]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    postgres_dsn: str | None = None
    kafka_bootstrap: str | None = None
    connect_url: str | None = None

    # Kafka security, for every Kafka client of the consumer (consumer/kafka/client_config.py).
    kafka_security_protocol: Annotated[
        Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None, BeforeValidator(_upper)
    ] = None
    kafka_sasl_mechanism: Annotated[
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None, BeforeValidator(_upper)
    ] = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # OAUTHBEARER: "oidc" fetches tokens with the client-credentials grant; "default" leaves the
    # token to librdkafka's unsecured-JWT properties (`sasl.oauthbearer.config`, for testing).
    kafka_sasl_oauthbearer_method: Literal["default", "oidc"] = "oidc"
    kafka_sasl_oauthbearer_client_id: str | None = None
    kafka_sasl_oauthbearer_client_secret: SecretStr | None = None
    kafka_sasl_oauthbearer_token_endpoint_url: str | None = None
    kafka_sasl_oauthbearer_scope: str | None = None
    kafka_ssl_ca_location: Path | None = None
    kafka_ssl_certificate_location: Path | None = None
    kafka_ssl_key_location: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    # Any other librdkafka property, by its name (values are masked in a repr: some are secrets).
    kafka: dict[str, Annotated[SecretStr, BeforeValidator(_property_value)]] = Field(default_factory=dict)

    schema_registry_url: str | None = None  # user:password@ in it works, and is moved out of the URL
    schema_registry_user: str | None = None
    schema_registry_password: SecretStr | None = None
    schema_registry_token: SecretStr | None = None  # sent as `Authorization: Bearer`
    schema_registry_ca_cert: Path | None = None

    clickhouse_url: str | None = None
    clickhouse_user: str | None = None
    clickhouse_password: SecretStr | None = None
    clickhouse_ca_cert: Path | None = None
    clickhouse_client_cert: Path | None = None
    clickhouse_client_key: Path | None = None
    # Verification of the server's certificate over https; off only to test against a self-signed one.
    clickhouse_verify: bool = True
    # LZ4 on the HTTP inserts and results: for a ClickHouse across a slow network (costs CPU).
    clickhouse_compress: bool = False
    # How long one request to ClickHouse may take: a server that stopped answering (frozen, cut
    # off) fails the insert after this, so its shard backs off and the others keep flowing.
    clickhouse_timeout_s: float = Field(120.0, gt=0)
    # A sharded cluster (consumer.sink.shards): its name in the servers' remote_servers, and one
    # URL per shard, in the cluster's shard order (shard 1 first); the consumer writes through
    # these only. Partition p of every topic is written to shard p % shards.
    clickhouse_cluster: str | None = None
    clickhouse_shard_urls: str | None = None  # comma-separated
    # The cluster replicates through Keeper: Replicated* locals and ON CLUSTER DDL (untested live).
    clickhouse_replicated: bool = False
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
    # The poison breaker (consumer.engine.breaker): over this share of poison among a topic's
    # messages in the window, and at least the minimum count, poison waits instead of being
    # dead-lettered. A minimum of 0 turns it off.
    poison_breaker_share: float = Field(0.5, gt=0, le=1)
    poison_breaker_min_messages: int = Field(100, ge=0)
    poison_breaker_window_s: float = Field(60.0, gt=0)
    clickhouse_embedded_path: Path = Path(".cdc-clickhouse")
    batch_max_rows: int = Field(200_000, gt=0)
    batch_max_bytes: int = Field(64 * 2**20, gt=0)
    batch_max_age_s: float = Field(0.5, gt=0)
    # Caught up, write a batch at once instead of waiting out its age (consumer.engine.batch).
    flush_when_caught_up: bool = True
    min_insert_interval_s: float = Field(0.2, ge=0)
    # Tables whose inserts may run side by side when several are due (1: one after another).
    insert_concurrency: int = Field(4, ge=1, le=64)
    poll_max_messages: int = Field(10_000, gt=0)
    metrics_port: int = Field(19108, ge=0, le=65535)
    # Loopback unless told: in a container, 0.0.0.0 for Prometheus and the probes to reach it.
    metrics_bind_address: str = "127.0.0.1"
    # A TRUNCATE in Postgres: "dlq" sends the event to the dead-letter topic for an operator to act
    # on (the default: ClickHouse keeps its rows); "skip" logs and ignores it.
    truncate_action: Literal["dlq", "skip"] = "dlq"
    # Fact batches decoded and mapped by ClickHouse (INSERT … FORMAT Avro into a staging table
    # whose materialized view writes the rows): far less CPU than decoding in Python (bench/README.md).
    server_decode: bool = True
    # Per dimension partition, the rows last applied, by key: a change's unchanged (TOASTed)
    # columns come from there instead of a ClickHouse look-up. 0: always ask ClickHouse.
    latest_rows_kept: int = Field(10_000, ge=0)
    # ... and at most this many bytes of them per partition (the rows carry the TOASTed values).
    latest_rows_max_bytes: int = Field(32 * 2**20, ge=0)
    # Columns schema evolution (extra_columns = "add") may add to one table, over its life: a
    # change that would add more is dead-lettered (too_many_new_columns), the table left as it is.
    max_evolved_columns: int = Field(100, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            SecretFileSettingsSource(settings_cls),
            KafkaPropertySettingsSource(settings_cls),
        ]
        config_file = os.environ.get("CDC_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise ConfigError(f"CDC_CONFIG={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            if isinstance(value, str):
                value = redact_url(hide_password(value) if name.endswith(("_url", "_dsn")) else value)
            yield name, value

    @field_validator("clickhouse_url", "schema_registry_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            scheme, host, _ = parts.scheme, parts.hostname, parts.port
        except ValueError:
            scheme = host = None
        if scheme not in ("http", "https") or not host:
            # Raised bare of the value: pydantic's own message would quote the URL as given.
            raise ValueError(f"must be http(s)://host[:port][/path], not {hide_password(url)!r}")
        return url

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems = [*self._kafka_problems(), *self._clickhouse_problems(), *self._registry_problems()]
        for name in (
            "kafka_ssl_ca_location",
            "kafka_ssl_certificate_location",
            "kafka_ssl_key_location",
            "schema_registry_ca_cert",
            "clickhouse_ca_cert",
            "clickhouse_client_cert",
            "clickhouse_client_key",
        ):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                problems.append(f"{env_name(name)}={path}: no such file")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _kafka_problems(self) -> list[str]:
        problems = []
        for key in self.kafka:
            if key in NAMED_KAFKA_PROPERTIES:
                problems.append(f"Kafka property {key!r}: set {env_name(NAMED_KAFKA_PROPERTIES[key])} instead")
            elif not _KAFKA_PROPERTY_NAME.match(key):
                problems.append(f"Kafka property {key!r}: not a librdkafka property name")
        protocol, mechanism = self.kafka_security_protocol, self.kafka_sasl_mechanism
        if mechanism and protocol not in SASL_PROTOCOLS:
            problems.append("CDC_KAFKA_SASL_MECHANISM needs CDC_KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)")
        if protocol in SASL_PROTOCOLS and not mechanism:
            problems.append(f"CDC_KAFKA_SECURITY_PROTOCOL={protocol} needs CDC_KAFKA_SASL_MECHANISM")
        password_sasl = mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
        oidc = mechanism == "OAUTHBEARER" and self.kafka_sasl_oauthbearer_method == "oidc"
        needed = {
            "kafka_sasl_username": password_sasl,
            "kafka_sasl_password": password_sasl,
            "kafka_sasl_oauthbearer_client_id": oidc,
            "kafka_sasl_oauthbearer_client_secret": oidc,
            "kafka_sasl_oauthbearer_token_endpoint_url": oidc,
        }
        allowed = {**needed, "kafka_sasl_oauthbearer_scope": oidc}
        for name, required in needed.items():
            if required and getattr(self, name) is None:
                problems.append(f"CDC_KAFKA_SASL_MECHANISM={mechanism} needs {env_name(name)}")
        for name, used in allowed.items():
            if not used and getattr(self, name) is not None:
                what = f"CDC_KAFKA_SASL_MECHANISM={mechanism}" if mechanism else "no CDC_KAFKA_SASL_MECHANISM"
                problems.append(f"{env_name(name)} is set but not used with {what}")
        tls = {
            name: getattr(self, name)
            for name in (
                "kafka_ssl_ca_location",
                "kafka_ssl_certificate_location",
                "kafka_ssl_key_location",
                "kafka_ssl_key_password",
            )
        }
        if protocol not in TLS_PROTOCOLS:
            problems += [
                f"{env_name(name)} needs CDC_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL"
                for name, value in tls.items()
                if value is not None
            ]
        if (tls["kafka_ssl_certificate_location"] is None) != (tls["kafka_ssl_key_location"] is None):
            problems.append("CDC_KAFKA_SSL_CERTIFICATE_LOCATION and CDC_KAFKA_SSL_KEY_LOCATION go together")
        if tls["kafka_ssl_key_password"] is not None and tls["kafka_ssl_key_location"] is None:
            problems.append("CDC_KAFKA_SSL_KEY_PASSWORD is set without CDC_KAFKA_SSL_KEY_LOCATION")
        return problems

    def _clickhouse_problems(self) -> list[str]:
        problems = []
        url = urlsplit(self.clickhouse_url or "")
        tls_files = ("clickhouse_ca_cert", "clickhouse_client_cert", "clickhouse_client_key")
        if url.scheme != "https":
            problems += [
                f"{env_name(name)} needs an https:// CDC_CLICKHOUSE_URL"
                for name in tls_files
                if getattr(self, name) is not None
            ]
        if (self.clickhouse_client_cert is None) != (self.clickhouse_client_key is None):
            problems.append("CDC_CLICKHOUSE_CLIENT_CERT and CDC_CLICKHOUSE_CLIENT_KEY go together")
        problems += _credentials_twice("CDC_CLICKHOUSE", url, self.clickhouse_user, self.clickhouse_password)
        if not self.clickhouse_url and (self.clickhouse_user or self.clickhouse_password):
            problems.append("CDC_CLICKHOUSE_USER / _PASSWORD need CDC_CLICKHOUSE_URL (the embedded one has no users)")
        if bool(self.clickhouse_cluster) != bool(self.clickhouse_shard_urls):
            problems.append("CDC_CLICKHOUSE_CLUSTER and CDC_CLICKHOUSE_SHARD_URLS go together (one URL per shard)")
        if self.clickhouse_cluster and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.clickhouse_cluster):
            problems.append(f"CDC_CLICKHOUSE_CLUSTER must be a plain identifier, not {self.clickhouse_cluster!r}")
        if self.clickhouse_replicated and not self.clickhouse_cluster:
            problems.append("CDC_CLICKHOUSE_REPLICATED needs CDC_CLICKHOUSE_CLUSTER")
        return problems

    @property
    def shard_urls(self) -> list[str]:
        """One ClickHouse URL per shard; the one server's URL when there is no cluster."""
        if not self.clickhouse_shard_urls:
            return [self.clickhouse_url] if self.clickhouse_url else []
        return [url.strip() for url in self.clickhouse_shard_urls.split(",") if url.strip()]

    def _registry_problems(self) -> list[str]:
        url = urlsplit(self.schema_registry_url or "")
        user, password, token = self.schema_registry_user, self.schema_registry_password, self.schema_registry_token
        problems = _credentials_twice("CDC_SCHEMA_REGISTRY", url, user, password)
        if token is not None and (user or password or url.username):
            problems.append("CDC_SCHEMA_REGISTRY_TOKEN and a user/password: give one way to authenticate")
        if (user is None) != (password is None):
            problems.append("CDC_SCHEMA_REGISTRY_USER and CDC_SCHEMA_REGISTRY_PASSWORD go together")
        return problems


def _credentials_twice(prefix: str, url, user: str | None, password: SecretStr | None) -> list[str]:
    if (user is not None and url.username) or (password is not None and url.password):
        return [f"{prefix}_URL has user:password@ and {prefix}_USER / _PASSWORD are set: give them once"]
    return []


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ConfigError(redact_url(f"invalid configuration: {problems}")) from None


def _problem(err) -> str:
    message = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:
        return message
    return f"{'.'.join(str(p) for p in err['loc'])} ({env_name(str(err['loc'][0]))}): {message}"


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return load_settings()


def require(name: str) -> str:
    value = getattr(_cached(), name)
    if not value:
        raise ConfigError(f'CDC_{name.upper()} is not set; for the native stack run: eval "$(cdc-consumer stack env)"')
    return value
