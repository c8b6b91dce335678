"""A password planted in CDC_SCHEMA_REGISTRY_URL or CDC_CLICKHOUSE_URL (or given apart from it)
appears in no log line, no exception text (nor its chain) and no ConfigError."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from consumer.app.clients import clickhouse_client, schema_registry
from consumer.core.secrets import redact_url
from consumer.decode.envelope import DecodeError
from consumer.decode.registry import RegistryUnavailable, SchemaRegistry
from consumer.settings import ConfigError, load_settings
from consumer.sink.clickhouse import connect

SECRET = "pl4nted-Secret"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("CDC_"):
            monkeypatch.delenv(name)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Answering:
    """An HTTP server answering every GET with one status and body; records the headers it got."""

    def __init__(self, status: int, body: dict):
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.headers.append(dict(self.headers))
                payload = json.dumps({**body, "echo": self.path}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def everything_said(error: BaseException, caplog) -> str:
    return "".join(traceback.format_exception(error)) + "\n".join(r.getMessage() for r in caplog.records)


def test_redact_url_hides_the_password_of_every_url_in_a_text() -> None:
    text = f"GET http://user:{SECRET}@registry:8080/x failed; then https://u:{SECRET}%40x@ch:8443/db and 'ftp://a:{SECRET}@h'"
    redacted = redact_url(text)
    assert SECRET not in redacted
    assert "http://user:***@registry:8080/x" in redacted and "https://u:***@ch:8443/db" in redacted
    assert redact_url("http://registry:8080/apis no credentials") == "http://registry:8080/apis no credentials"


def test_an_unreachable_registry_says_so_without_the_password(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    registry = SchemaRegistry(f"http://cdc:{SECRET}@127.0.0.1:{closed_port()}/apis/ccompat/v7", timeout=1.0)
    assert SECRET not in registry.url
    with pytest.raises(RegistryUnavailable) as error:
        registry.schema(1)
    said = everything_said(error.value, caplog)
    assert "unreachable" in said and SECRET not in said


@pytest.mark.parametrize(
    ("status", "raised"), [(500, RegistryUnavailable), (404, DecodeError), (401, RegistryUnavailable)]
)
def test_a_registry_error_says_so_without_the_password(caplog, status, raised) -> None:
    caplog.set_level(logging.DEBUG)
    server = Answering(status, {"error_code": 40403, "message": f"echoing http://cdc:{SECRET}@somewhere"})
    try:
        registry = schema_registry(
            load_settings(schema_registry_url=f"http://cdc:{SECRET}@127.0.0.1:{server.port}/apis/ccompat/v7")
        )
        with pytest.raises(raised) as error:
            registry.schema(7)
    finally:
        server.close()
    said = everything_said(error.value, caplog)
    assert "schemas/ids/7" in said or "schema id 7" in said
    assert SECRET not in said
    # The credentials moved from the URL into the request's basic auth.
    assert server.headers[0]["Authorization"] == "Basic " + base64.b64encode(f"cdc:{SECRET}".encode()).decode()


def test_the_registry_sends_a_bearer_token() -> None:
    server = Answering(500, {})
    try:
        registry = schema_registry(
            load_settings(schema_registry_url=f"http://127.0.0.1:{server.port}", schema_registry_token=SECRET)
        )
        with pytest.raises(RegistryUnavailable) as error:
            registry.schema(1)
    finally:
        server.close()
    assert server.headers[0]["Authorization"] == f"Bearer {SECRET}" and SECRET not in str(error.value)


def test_clickhouse_that_cannot_be_reached_is_named_without_the_password(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConnectionError) as error:
        connect(f"http://cdc:{SECRET}@127.0.0.1:{closed_port()}/analytics")
    said = everything_said(error.value, caplog)
    assert "cannot connect to ClickHouse at http://cdc:***@127.0.0.1" in said and SECRET not in said


def test_a_clickhouse_url_that_is_not_http_is_a_config_error_without_the_password(caplog) -> None:
    with pytest.raises(ConfigError) as error:
        clickhouse_client(load_settings(clickhouse_url=f"tcp://cdc:{SECRET}@clickhouse:9000"))
    said = everything_said(error.value, caplog)
    assert "must be http(s)" in said and SECRET not in said


# URLs the pattern of redact_url alone does not see whole: no scheme, a space, a bad port, an "@"
# or a "/" in the password, a scheme that is not http.
ODD_URLS = [
    f"cdc:{SECRET}@clickhouse:8123",
    f"http://cdc:{SECRET} x@127.0.0.1:1",
    f"http://cdc:{SECRET}@clickhouse:port",
    f"http://cdc:a@{SECRET}@127.0.0.1:1",
    f"http://cdc:{SECRET}/x@127.0.0.1:1",
    f"clickhouse://cdc:{SECRET}@clickhouse:9000/db",
    f"tcp://cdc:{SECRET}@[::1",
]


@pytest.mark.parametrize("url", ODD_URLS)
def test_no_clickhouse_url_puts_its_password_in_an_error(caplog, url) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises((ValueError, ConnectionError)) as error:
        connect(url)
    assert SECRET not in everything_said(error.value, caplog)
    assert SECRET not in settings_said(caplog, clickhouse_url=url)


@pytest.mark.parametrize("url", ODD_URLS)
def test_no_registry_url_puts_its_password_in_an_error(caplog, url) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as error:
        SchemaRegistry(url, timeout=1.0).schema(1)
    assert SECRET not in everything_said(error.value, caplog)
    assert SECRET not in settings_said(caplog, schema_registry_url=url)


def settings_said(caplog, **settings) -> str:
    """The settings' repr, or the ConfigError they raise."""
    try:
        return repr(load_settings(**settings))
    except ConfigError as error:
        return everything_said(error, caplog)


def test_settings_show_no_password_of_an_odd_url() -> None:
    settings = load_settings(clickhouse_url=f"http://cdc:{SECRET} x@ch:8123")
    assert SECRET not in repr(settings) and "cdc:***@ch:8123" in repr(settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"clickhouse_url": f"http://cdc:{SECRET}@ch:8123", "clickhouse_ca_cert": __file__},
        {"clickhouse_url": f"https://cdc:{SECRET}@ch:8443", "clickhouse_password": "other"},
        {"schema_registry_url": f"http://cdc:{SECRET}@reg:8080", "schema_registry_token": "t"},
        {"clickhouse_url": f"http://cdc:{SECRET}@ch:8123", "batch_max_rows": 0},
    ],
)
def test_configuration_errors_do_not_repeat_the_password(settings) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(**settings)
    assert "invalid configuration" in str(error.value) and SECRET not in str(error.value)


def test_clickhouse_tls_and_credentials_reach_the_client(monkeypatch, tmp_path) -> None:
    import clickhouse_connect

    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.pem", "client.key"))
    for path in (ca, cert, key):
        path.write_text("pem")
    calls: list[dict] = []

    class Client:
        def command(self, _statement) -> None:
            pass

    def get_client(**options) -> Client:
        calls.append(options)
        return Client()

    monkeypatch.setattr(clickhouse_connect, "get_client", get_client)
    settings = load_settings(
        clickhouse_url="https://ch.example:8443",
        clickhouse_user="cdc",
        clickhouse_password=SECRET,
        clickhouse_ca_cert=ca,
        clickhouse_client_cert=cert,
        clickhouse_client_key=key,
    )
    clickhouse_client(settings)
    (options,) = calls
    assert {k: options[k] for k in ("host", "port", "username", "password", "secure", "verify")} == {
        "host": "ch.example",
        "port": 8443,
        "username": "cdc",
        "password": SECRET,
        "secure": True,
        "verify": True,
    }
    assert (options["ca_cert"], options["client_cert"], options["client_cert_key"]) == (str(ca), str(cert), str(key))
    calls.clear()
    clickhouse_client(load_settings(clickhouse_url=f"http://old:{SECRET}@ch:8123/db"))  # the URL form still works
    assert calls[-1]["username"] == "old" and calls[-1]["password"] == SECRET and calls[-1]["database"] == "db"
