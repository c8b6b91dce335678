"""The registry client verifies HTTPS against CDC_SCHEMA_REGISTRY_CA_CERT even when the
environment names another CA bundle (requests lets REQUESTS_CA_BUNDLE override a session's
`verify`). A real HTTPS server on loopback, with certificates from the secured stack's CA code."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import certifi
import pytest

from cdc_dev.stack.layout import StackLayout, StackPorts
from consumer.decode.registry import RegistryUnavailable, SchemaRegistry

SCHEMA = {"type": "record", "name": "Row", "fields": [{"name": "id", "type": "long"}]}


class _Registry(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"schema": json.dumps(SCHEMA)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def https_registry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    tls = StackLayout(root=tmp_path, ports=StackPorts(), secure=True).certificates()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", tls.ca
    finally:
        server.shutdown()
        server.server_close()


def test_the_registry_ca_wins_over_requests_ca_bundle(https_registry, monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca = https_registry
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # public CAs only: not ours
    assert SchemaRegistry(url, ca_cert=ca).schema(1)["name"] == "Row"
    with pytest.raises(RegistryUnavailable, match=r"(?i)certificate"):
        SchemaRegistry(url).schema(1)  # the environment's bundle, which does not know the stack's CA
