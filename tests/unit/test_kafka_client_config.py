"""One set of Kafka client properties for every client: the librdkafka dict built for each
combination of settings, the combinations refused at start, and secrets kept out of reprs."""

from __future__ import annotations

import os

import pytest
from confluent_kafka import KafkaException

from consumer.engine.dlq import DeadLetterQueue
from consumer.kafka.client_config import KafkaClientConfig, kafka_client_config
from consumer.kafka.lag import LagReader
from consumer.kafka.source import KafkaSource, SourceConfig
from consumer.settings import ConfigError, load_settings

SECRET = "s3cret-Pa55word"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("CDC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CDC_KAFKA_BOOTSTRAP", "broker:9093")


def built(monkeypatch, **env: str) -> dict:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return kafka_client_config(load_settings()).client()


def refused(monkeypatch, **env: str) -> str:
    with pytest.raises(ConfigError) as error:
        built(monkeypatch, **env)
    return str(error.value)


@pytest.fixture
def pem(tmp_path):
    def write(name: str) -> str:
        path = tmp_path / name
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        return str(path)

    return write


def test_plaintext_is_the_bootstrap_alone(monkeypatch) -> None:
    assert built(monkeypatch) == {"bootstrap.servers": "broker:9093"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
def test_sasl_with_a_password_over_tls(monkeypatch, pem, mechanism) -> None:
    ca = pem("ca.pem")
    assert built(
        monkeypatch,
        CDC_KAFKA_SECURITY_PROTOCOL="sasl_ssl",
        CDC_KAFKA_SASL_MECHANISM=mechanism,
        CDC_KAFKA_SASL_USERNAME="consumer",
        CDC_KAFKA_SASL_PASSWORD=SECRET,
        CDC_KAFKA_SSL_CA_LOCATION=ca,
    ) == {
        "bootstrap.servers": "broker:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": mechanism.upper(),
        "sasl.username": "consumer",
        "sasl.password": SECRET,
        "ssl.ca.location": ca,
    }


def test_oauthbearer_with_oidc_client_credentials(monkeypatch) -> None:
    assert built(
        monkeypatch,
        CDC_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        CDC_KAFKA_SASL_MECHANISM="OAUTHBEARER",
        CDC_KAFKA_SASL_OAUTHBEARER_CLIENT_ID="cdc",
        CDC_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET=SECRET,
        CDC_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL="https://idp.example/token",
        CDC_KAFKA_SASL_OAUTHBEARER_SCOPE="kafka",
    ) == {
        "bootstrap.servers": "broker:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.client.id": "cdc",
        "sasl.oauthbearer.client.secret": SECRET,
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example/token",
        "sasl.oauthbearer.scope": "kafka",
    }


def test_mutual_tls_with_an_encrypted_key(monkeypatch, pem) -> None:
    ca, cert, key = pem("ca.pem"), pem("client.pem"), pem("client.key")
    assert built(
        monkeypatch,
        CDC_KAFKA_SECURITY_PROTOCOL="SSL",
        CDC_KAFKA_SSL_CA_LOCATION=ca,
        CDC_KAFKA_SSL_CERTIFICATE_LOCATION=cert,
        CDC_KAFKA_SSL_KEY_LOCATION=key,
        CDC_KAFKA_SSL_KEY_PASSWORD=SECRET,
    ) == {
        "bootstrap.servers": "broker:9093",
        "security.protocol": "SSL",
        "ssl.ca.location": ca,
        "ssl.certificate.location": cert,
        "ssl.key.location": key,
        "ssl.key.password": SECRET,
    }


def test_secrets_come_from_files(monkeypatch, tmp_path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")
    properties = built(
        monkeypatch,
        CDC_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        CDC_KAFKA_SASL_MECHANISM="PLAIN",
        CDC_KAFKA_SASL_USERNAME="consumer",
        CDC_KAFKA_SASL_PASSWORD_FILE=str(secret_file),
    )
    assert properties["sasl.password"] == SECRET


def test_a_secret_file_that_is_missing_or_given_twice_is_refused(monkeypatch, tmp_path) -> None:
    base = dict(CDC_KAFKA_SECURITY_PROTOCOL="SASL_SSL", CDC_KAFKA_SASL_MECHANISM="PLAIN", CDC_KAFKA_SASL_USERNAME="u")
    missing = refused(monkeypatch, **base, CDC_KAFKA_SASL_PASSWORD_FILE=str(tmp_path / "nope"))
    assert "CDC_KAFKA_SASL_PASSWORD_FILE" in missing and "cannot read" in missing
    (tmp_path / "password").write_text(SECRET)
    twice = refused(
        monkeypatch, **base, CDC_KAFKA_SASL_PASSWORD=SECRET, CDC_KAFKA_SASL_PASSWORD_FILE=str(tmp_path / "password")
    )
    assert "both set" in twice and SECRET not in twice


def test_pass_through_properties_from_the_file_and_the_environment(monkeypatch, tmp_path) -> None:
    config = tmp_path / "consumer.toml"
    config.write_text('[kafka]\n"socket.keepalive.enable" = true\n"fetch.max.bytes" = 1048576\n"client.rack" = "a"\n')
    properties = built(
        monkeypatch,
        CDC_CONFIG=str(config),
        CDC_KAFKA_PROPERTY__CLIENT_RACK="b",  # the environment wins over the file
        CDC_KAFKA_PROPERTY__SSL_ENDPOINT_IDENTIFICATION_ALGORITHM="none",
    )
    assert properties == {
        "bootstrap.servers": "broker:9093",
        "socket.keepalive.enable": "true",
        "fetch.max.bytes": "1048576",
        "client.rack": "b",
        "ssl.endpoint.identification.algorithm": "none",
    }


def test_pass_through_as_json(monkeypatch) -> None:
    assert built(monkeypatch, CDC_KAFKA='{"client.rack": "eu-1a"}')["client.rack"] == "eu-1a"


def test_a_client_keeps_the_properties_its_logic_needs(monkeypatch) -> None:
    shared = kafka_client_config(load_settings(kafka={"enable.auto.commit": "true", "client.rack": "a"}))
    own = shared.client({"enable.auto.commit": False, "group.id": "g"})
    assert own == {"bootstrap.servers": "broker:9093", "enable.auto.commit": False, "client.rack": "a", "group.id": "g"}


def test_a_client_default_gives_way_to_the_operators_property(monkeypatch) -> None:
    default = {"fetch.queue.backoff.ms": 20}
    plain = kafka_client_config(load_settings()).client({"group.id": "g"}, defaults=default)
    assert plain["fetch.queue.backoff.ms"] == 20
    tuned = kafka_client_config(load_settings(kafka={"fetch.queue.backoff.ms": "500"}))
    assert tuned.client({"group.id": "g"}, defaults=default)["fetch.queue.backoff.ms"] == "500"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"CDC_KAFKA_SASL_MECHANISM": "PLAIN", "CDC_KAFKA_SASL_USERNAME": "u", "CDC_KAFKA_SASL_PASSWORD": SECRET},
            "needs CDC_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        ),
        ({"CDC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs CDC_KAFKA_SASL_MECHANISM"),
        (
            {"CDC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "CDC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"},
            "needs CDC_KAFKA_SASL_USERNAME",
        ),
        ({"CDC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "CDC_KAFKA_SASL_MECHANISM": "GSSAPI"}, "kafka_sasl_mechanism"),
        (
            {"CDC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "CDC_KAFKA_SASL_MECHANISM": "OAUTHBEARER"},
            "needs CDC_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
        ),
        ({"CDC_KAFKA_SASL_USERNAME": "u"}, "CDC_KAFKA_SASL_USERNAME is set but not used"),
        ({"CDC_KAFKA_SECURITY_PROTOCOL": "SSL", "CDC_KAFKA_SSL_CA_LOCATION": "/no/such/ca.pem"}, "no such file"),
        ({"CDC_KAFKA_SSL_CA_LOCATION": __file__}, "needs CDC_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL"),
        ({"CDC_KAFKA_SECURITY_PROTOCOL": "SSL", "CDC_KAFKA_SSL_CERTIFICATE_LOCATION": __file__}, "go together"),
        ({"CDC_KAFKA_PROPERTY__SASL_PASSWORD": SECRET}, "set CDC_KAFKA_SASL_PASSWORD instead"),
        ({"CDC_KAFKA": '{"Not A Property": "x"}'}, "not a librdkafka property name"),
    ],
)
def test_inconsistent_settings_are_refused_at_start(monkeypatch, env, expected) -> None:
    message = refused(monkeypatch, **env)
    assert expected in message and SECRET not in message


def test_no_repr_shows_a_secret(monkeypatch) -> None:
    monkeypatch.setenv("CDC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CDC_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("CDC_KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("CDC_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("CDC_KAFKA_PROPERTY__SSL_KEYSTORE_PASSWORD", SECRET)
    settings = load_settings()
    config = kafka_client_config(settings)
    assert SECRET not in repr(settings) and SECRET not in str(settings) and SECRET not in repr(config)
    assert "sasl.password" in repr(config)


def test_every_kafka_client_takes_the_shared_properties() -> None:
    """A property librdkafka does not know makes each client refuse to start: proof it got them."""
    shared = KafkaClientConfig({"bootstrap.servers": "127.0.0.1:1", "no.such.property": "1"})
    for build in (
        lambda: KafkaSource(SourceConfig(shared, "g", ["t"]), None, None, None),
        lambda: DeadLetterQueue(shared, "dlq"),
        lambda: LagReader(shared, "g"),
    ):
        with pytest.raises(KafkaException, match=r"no\.such\.property"):
            build()
