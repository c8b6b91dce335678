"""The secured stack (`CDC_STACK_SECURE=1`) refuses every connection without TLS and a password,
and lets in the clients that bring both. Skipped on the plain stack (but for the Postgres socket
check, which holds in both modes); CI runs it with `-m secure` on a secured stack of its own
(Makefile, `test`)."""

from __future__ import annotations

import os
import socket
import ssl

import psycopg
import pytest
import requests
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from cdc_dev.stack.components import Postgres
from cdc_dev.stack.layout import HOST, StackLayout

pytestmark = [pytest.mark.stack, pytest.mark.secure]


@pytest.fixture
def secured(stack, native_stack: StackLayout) -> StackLayout:
    if not native_stack.secure:
        pytest.skip("needs the secured stack: CDC_STACK_SECURE=1")
    return native_stack


def _kafka_errors(properties: dict[str, str]) -> tuple[list[KafkaError], int | None]:
    """What a Kafka admin client met on its way in, and how many brokers it could list."""
    errors: list[KafkaError] = []
    admin = AdminClient({**properties, "error_cb": errors.append, "log_level": 0})
    try:
        return errors, len(admin.list_topics(timeout=5).brokers)
    except KafkaException:
        admin.poll(1)  # serves error_cb
        return errors, None


def test_kafka_refuses_plaintext_and_a_wrong_password(secured: StackLayout) -> None:
    good = secured.kafka_client_properties()
    errors, brokers = _kafka_errors({"bootstrap.servers": good["bootstrap.servers"]})
    assert brokers is None and errors, "a PLAINTEXT client must get nothing"
    assert {e.code() for e in errors} <= {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}
    errors, brokers = _kafka_errors({**good, "sasl.password": "not-the-password"})
    assert brokers is None
    assert KafkaError._AUTHENTICATION in {e.code() for e in errors}
    errors, brokers = _kafka_errors({**good, "sasl.mechanism": "PLAIN"})
    assert brokers is None, "only SCRAM-SHA-512 is enabled"
    assert _kafka_errors(good) == ([], secured.kafka_brokers)


def test_clickhouse_refuses_plain_http_and_unauthenticated_https(secured: StackLayout, stack) -> None:
    url = secured.clickhouse_url
    assert url.startswith("https://")
    with pytest.raises(requests.ConnectionError):
        requests.get(url.replace("https://", "http://") + "/ping", timeout=10)
    ca = stack.ca
    assert requests.get(f"{url}/ping", timeout=10, verify=ca).text.strip() == "Ok."  # no data: open
    for auth in (None, ("default", ""), ("cdc", "not-the-password")):
        refused = requests.get(url, params={"query": "SELECT 1"}, auth=auth, timeout=10, verify=ca)
        assert refused.status_code != 200 and "Authentication failed" in refused.text, (auth, refused.text)
    # A client spoofing its address gets nothing either: the proxy sets the header itself.
    spoofed = requests.get(url, params={"query": "SELECT 1"}, headers={"X-Forwarded-For": HOST}, timeout=10, verify=ca)
    assert "Authentication failed" in spoofed.text
    assert stack.clickhouse().query("SELECT currentUser()").result_rows == [("cdc",)]


def _native_hello(user: str, password: str) -> bytes:
    """ClickHouse's native-protocol Hello (client name, version 24.1, revision 54449, database,
    user, password), each string with its one-byte length."""

    def string(value: str) -> bytes:
        return bytes([len(value)]) + value.encode()

    return (
        b"\x00"
        + string("secure-test")
        + bytes([24, 1, 0xB1, 0xA9, 0x03])
        + string("")
        + string(user)
        + string(password)
    )


def _native_answer(port: int, ca: str, user: str, password: str) -> bytes:
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection((HOST, port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(_native_hello(user, password))
        return tls.recv(64)


def test_clickhouse_native_port_is_tls_and_needs_the_password(secured: StackLayout, stack) -> None:
    port = secured.clickhouse_nodes[0].tcp_port
    with socket.create_connection((HOST, port), timeout=10) as plain:
        plain.sendall(_native_hello("default", ""))
        assert not plain.recv(64).startswith(b"\x00"), "no native Hello without TLS"
    assert _native_answer(port, stack.ca, "default", "") == b""  # closed by the proxy
    assert _native_answer(port, stack.ca, "cdc", "not-the-password") == b""
    answer = _native_answer(port, stack.ca, "cdc", secured.client_password("clickhouse"))
    assert answer[:1] == b"\x00" and b"ClickHouse" in answer  # the server's Hello


def test_clickhouse_behind_the_proxy_lets_default_read_nothing(secured: StackLayout, stack) -> None:
    """The node's own loopback port: `default` (the serving session's user) may start listeners
    and nothing else, so a local process that skips the proxy reads and writes no data."""
    database = f"secure_{os.getpid()}"
    client = stack.clickhouse(database)  # created as `cdc`
    try:
        client.command("CREATE TABLE t (x Int32) ENGINE = MergeTree ORDER BY x")
        client.command("INSERT INTO t VALUES (1)")
        private = f"http://{HOST}:{secured.clickhouse_nodes[0].server_http_port}"
        for query in (f"SELECT * FROM {database}.t", f"INSERT INTO {database}.t VALUES (2)", "SHOW DATABASES"):
            answer = requests.post(private, data=query, timeout=10)
            assert answer.status_code != 200 or database not in answer.text, (query, answer.text)
        assert client.query("SELECT count() FROM t").result_rows == [(1,)]
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")


def test_registry_is_https_only(secured: StackLayout, stack) -> None:
    url = secured.schema_registry_url
    assert url.startswith("https://")
    with pytest.raises(requests.ConnectionError):
        requests.get(url.replace("https://", "http://") + "/subjects", timeout=10)
    assert requests.get(f"{url}/subjects", timeout=10, verify=stack.ca).status_code == 200


def test_postgres_refuses_connections_without_tls_or_password(secured: StackLayout, stack) -> None:
    dsn = stack.postgres_dsn
    assert "sslmode=verify-full" in dsn
    bare = dsn.split("?", 1)[0]
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(f"{bare}?sslmode=disable").close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn.replace(f":{secured.client_password('postgres')}@", ":not-the-password@")).close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        # Debezium too: every replication and query connection of the connector is TLS.
        debezium = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.application_name LIKE 'Debezium%'"
        ).fetchone()
    assert debezium[0] > 0 and debezium[0] == debezium[1], debezium


def test_postgres_socket_is_private_and_local_logins_need_the_password(native_stack: StackLayout) -> None:
    """The dev-stack hardening of both modes (runs on the plain stack too)."""
    postgres = Postgres(native_stack)
    mode = postgres.socket_dir.stat().st_mode & 0o777
    assert mode == 0o700, oct(mode)
    local = f"host={postgres.socket_dir} port={native_stack.ports.postgres_port} dbname=postgres user=postgres"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"{local} passfile=/dev/null").close()
    with psycopg.connect(f"{local} password={postgres.superuser_password}") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
