"""The librdkafka properties every Kafka client of the consumer shares: where the brokers are,
how to authenticate and encrypt, and the operator's pass-through properties.

Built once from the settings (:func:`kafka_client_config`) and handed to every client: the
consumer (KafkaSource), the DLQ producer and its admin client, the lag reader, replay's clients
and the CLI. Each client adds the properties its own logic depends on (`client(own)`); those win
over a pass-through property of the same name, which is reported once in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from consumer.settings import ConfigError, Settings

log = logging.getLogger(__name__)


class KafkaClientConfig:
    """Shared librdkafka properties. Its repr names the properties without their values."""

    def __init__(self, properties: Mapping[str, str]):
        if not properties.get("bootstrap.servers"):
            raise ConfigError('CDC_KAFKA_BOOTSTRAP is not set (for the native stack: eval "$(cdc-consumer stack env)")')
        self._properties = dict(properties)
        self._warned: set[str] = set()

    @classmethod
    def of(cls, kafka: KafkaClientConfig | str) -> KafkaClientConfig:
        """A bare bootstrap string means a plaintext cluster without authentication (tests, the dev stack)."""
        return kafka if isinstance(kafka, KafkaClientConfig) else cls({"bootstrap.servers": kafka})

    @property
    def bootstrap(self) -> str:
        return self._properties["bootstrap.servers"]

    def client(
        self, own: Mapping[str, object] | None = None, defaults: Mapping[str, object] | None = None
    ) -> dict[str, object]:
        """The configuration of one client: the shared properties and the client's `own`, over
        its `defaults` (which the shared properties may change)."""
        own = own or {}
        for key in own.keys() & self._properties.keys():
            if own[key] != self._properties[key] and key not in self._warned:
                self._warned.add(key)
                log.warning("Kafka property %s is set by the consumer itself for this client; yours is ignored", key)
        return {**(defaults or {}), **self._properties, **own}

    def __repr__(self) -> str:
        names = ", ".join(sorted(k for k in self._properties if k != "bootstrap.servers"))
        return f"KafkaClientConfig(bootstrap.servers={self.bootstrap!r}, with: {names or 'nothing else'})"


def kafka_client_config(settings: Settings) -> KafkaClientConfig:
    """The one place the settings become librdkafka properties (the settings validated their
    combinations already)."""
    named: dict[str, object] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol,
        "sasl.mechanism": settings.kafka_sasl_mechanism,
        "sasl.username": settings.kafka_sasl_username,
        "sasl.password": settings.kafka_sasl_password,
        "ssl.ca.location": settings.kafka_ssl_ca_location,
        "ssl.certificate.location": settings.kafka_ssl_certificate_location,
        "ssl.key.location": settings.kafka_ssl_key_location,
        "ssl.key.password": settings.kafka_ssl_key_password,
    }
    if settings.kafka_sasl_mechanism == "OAUTHBEARER":
        named["sasl.oauthbearer.method"] = settings.kafka_sasl_oauthbearer_method
        named["sasl.oauthbearer.client.id"] = settings.kafka_sasl_oauthbearer_client_id
        named["sasl.oauthbearer.client.secret"] = settings.kafka_sasl_oauthbearer_client_secret
        named["sasl.oauthbearer.token.endpoint.url"] = settings.kafka_sasl_oauthbearer_token_endpoint_url
        named["sasl.oauthbearer.scope"] = settings.kafka_sasl_oauthbearer_scope
    properties = {key: _reveal(value) for key, value in named.items() if value is not None}
    properties.update((key, value.get_secret_value()) for key, value in settings.kafka.items())
    return KafkaClientConfig(properties)


def _reveal(value: object) -> str:
    secret = getattr(value, "get_secret_value", None)
    return secret() if secret is not None else str(value)
