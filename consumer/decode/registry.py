"""Client for a Confluent-compatible schema registry (Apicurio's `/apis/ccompat/v7` in our stack).

Only what the decoder needs: the writer schema for a schema id from the Confluent wire format,
fetched once and cached for the life of the process (ids are immutable in a registry).

Failure policy, which the pipeline relies on:

* the id does not exist (404 with a registry error body) -> `DecodeError("unknown_schema_id")`:
  the message is poison, dead-letter it;
* the schema exists but is not Avro, or fastavro cannot parse it -> `DecodeError`
  (`unsupported_schema_type` / `invalid_writer_schema`), cached so it is not fetched again;
* anything that says nothing about the message — connection refused, timeout, 5xx, 429, 401/403,
  a 404 that is not a registry answer (wrong base URL), a body that is not the registry's JSON —
  -> `RegistryUnavailable`: pause and retry, never dead-letter.

Authentication: HTTP basic (`user`/`password`, or `user:password@` in the URL, which is moved out
of it) or a bearer `token`; `ca_cert` verifies a registry whose certificate a private CA signed.
The client's URL, and so every error message (they end up in logs and DLQ headers), carries no
credentials.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import requests
from cachetools import LRUCache, TTLCache
from fastavro import parse_schema
from pydantic import SecretStr

from consumer.core.errors import DecodeError, RegistryUnavailable
from consumer.core.secrets import hide_password, redact_secrets
from consumer.decode.limits import check_depth, check_scale

__all__ = ["SchemaRegistry", "parse_writer_schema"]


def parse_writer_schema(raw: Any, named_schemas: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse an Avro writer schema (as JSON-decoded) with fastavro, after two normalizations.

    * Confluent's AvroData marks Connect `Decimal` as `logicalType: decimal` even when the scale is
      negative or larger than the precision (legal in PostgreSQL 15+, e.g. NUMERIC(3,5)); fastavro
      refuses to parse such a schema at all. For those fields the `logicalType` is dropped.
    * Connect `Date`/`Time`/`Timestamp` (`date`/`time-millis`/`timestamp-millis`): the logicalType is
      dropped so that an out-of-range value is reported by the decoder as `bad_logical_value` on
      its column, not as an anonymous ValueError from inside fastavro's reader.

    In both cases fastavro returns the underlying bytes/int and the decoder converts it, using the
    `connect.name` and `connect.parameters` properties, which are kept as they are.
    """
    return parse_schema(_normalize(raw), named_schemas=named_schemas)


_CONNECT_TEMPORAL = {
    "date": "org.apache.kafka.connect.data.Date",
    "time-millis": "org.apache.kafka.connect.data.Time",
    "timestamp-millis": "org.apache.kafka.connect.data.Timestamp",
}


def _normalize(node: Any) -> Any:
    if isinstance(node, list):
        return [_normalize(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: (_normalize(v) if k in ("type", "fields", "items", "values") else v) for k, v in node.items()}
    logical = out.get("logicalType")
    if logical in _CONNECT_TEMPORAL and out.get("connect.name") == _CONNECT_TEMPORAL[logical]:
        del out["logicalType"]
    elif logical == "decimal" and out.get("type") in ("bytes", "fixed"):
        precision, scale = out.get("precision"), check_scale(out.get("scale", 0), f"field {out.get('name')!r}")
        valid = isinstance(precision, int) and isinstance(scale, int) and precision > 0 and 0 <= scale <= precision
        if not valid:
            del out["logicalType"]
    return out


SCHEMAS_KEPT = 4096
UNKNOWN_IDS_KEPT = 10_000
UNKNOWN_ID_TTL_S = 60.0
# Debezium's writer schemas are tens of kilobytes; an answer far larger is not one of them.
MAX_RESPONSE_BYTES = 4 * 2**20


class SchemaRegistry:
    """`schema(id)` -> parsed fastavro schema, cached forever per id. Thread-safe."""

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        session: requests.Session | None = None,
        *,
        user: str | None = None,
        password: SecretStr | str | None = None,
        token: SecretStr | str | None = None,
        ca_cert: Path | None = None,
        unknown_id_ttl_s: float = UNKNOWN_ID_TTL_S,
    ) -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises for a port that is not a number
        except ValueError:
            # Without the parser's words: they quote the part it choked on, which may be the password.
            raise ValueError(f"schema registry URL {hide_password(url)!r} is not a URL (a bad host or port)") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"schema registry URL must be http(s)://host[:port][/path], not {hide_password(url)!r}")
        if parts.username is not None:
            if user is not None or token is not None:
                raise ValueError("schema registry credentials given both in the URL and apart from it")
            user, password = unquote(parts.username), unquote(parts.password or "")
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        if token is not None and user is not None:
            raise ValueError("schema registry: a token or a user and password, not both")
        self.url = urlunsplit(parts).rstrip("/")
        # Whatever a library makes of them, these never reach an error's text.
        self._secrets = (url, _reveal(password), _reveal(token))
        self.timeout = timeout
        self._session = session or requests.Session()
        if user is not None:
            self._session.auth = (user, _reveal(password) or "")
        if token is not None:
            self._session.headers["Authorization"] = f"Bearer {_reveal(token)}"
        # Given with each request, not as the session's `verify`: requests lets REQUESTS_CA_BUNDLE
        # (or CURL_CA_BUNDLE) in the environment override a session's, but not a request's.
        self._verify: str | None = str(ca_cert) if ca_cert is not None else None
        # Bounded: every message names a schema id, and a hostile producer can name a million.
        self._cache: LRUCache[int, dict[str, Any] | _Permanent] = LRUCache(SCHEMAS_KEPT)
        # Ids the registry does not know, remembered for a while rather than asked again per message.
        self._unknown: TTLCache[int, str] = TTLCache(UNKNOWN_IDS_KEPT, unknown_id_ttl_s)
        self._lock = threading.Lock()

    def schema(self, schema_id: int) -> dict[str, Any]:
        with self._lock:  # one fetch per id even when several threads miss at once
            cached = self._cache.get(schema_id)
            if cached is None:
                unknown = self._unknown.get(schema_id)
                if unknown is not None:
                    raise DecodeError("unknown_schema_id", unknown)
                try:
                    cached = self._load(schema_id)
                except DecodeError as e:
                    if e.error_class == "unknown_schema_id":
                        self._unknown[schema_id] = e.reason
                    raise
                self._cache[schema_id] = cached
        if isinstance(cached, _Permanent):
            # A fresh exception each time: re-raising one instance would grow its traceback forever.
            raise DecodeError(cached.error_class, cached.reason)
        return cached

    def close(self) -> None:
        self._session.close()

    def _redacted(self, text: str) -> str:
        return redact_secrets(text, *self._secrets)

    # -- fetching -------------------------------------------------------------------------

    def _load(self, schema_id: int) -> dict[str, Any] | _Permanent:
        """Parsed schema, or the reason a schema will never decode (cached like a schema).
        Raises, uncached, for unknown ids and for an unavailable registry."""
        try:
            body = self._get(f"/schemas/ids/{schema_id}", what=f"schema id {schema_id}")
            return self._parse(body, f"schema id {schema_id}", named={}, seen=set())
        except _Permanent as e:
            return e

    def _parse(self, body: dict[str, Any], what: str, named: dict[str, Any], seen: set[str]) -> dict[str, Any]:
        schema_type = body.get("schemaType") or "AVRO"
        if str(schema_type).upper() != "AVRO":
            raise _Permanent("unsupported_schema_type", f"{what} is a {schema_type} schema, not Avro")
        text = body.get("schema")
        if not isinstance(text, str):
            raise RegistryUnavailable(f"registry answer for {what} has no 'schema' string: {_short(body)}")
        # Schema references (not produced by AvroConverter 7.0, but legal): their named types must be
        # known to fastavro before the referencing schema is parsed.
        for ref in body.get("references") or []:
            subject, version = ref.get("subject"), ref.get("version")
            key = f"{subject}/{version}"
            if key in seen:
                continue
            seen.add(key)
            ref_what = f"reference {ref.get('name')!r} (subject {subject!r} version {version}) of {what}"
            ref_body = self._get(f"/subjects/{quote(str(subject), safe='')}/versions/{version}", what=ref_what)
            self._parse(ref_body, ref_what, named, seen)
        try:
            raw = json.loads(text)
        except RecursionError:
            raise _Permanent("too_deep", f"{what} nests too deep to parse") from None
        except ValueError as e:
            raise _Permanent("invalid_writer_schema", f"{what} is not valid JSON: {e}") from None
        try:
            check_depth(raw, what)
            return parse_writer_schema(raw, named)
        except DecodeError as e:  # a limit of consumer.decode.limits
            raise _Permanent(e.error_class, e.reason) from None
        except Exception as e:  # fastavro raises SchemaParseException, UnknownType, ValueError, ...
            raise _Permanent("invalid_writer_schema", f"fastavro cannot parse {what}: {e}") from None

    def _get(self, path: str, what: str) -> dict[str, Any]:
        url = self.url + path
        try:
            response = self._session.get(
                url,
                timeout=self.timeout,
                headers={"Accept": "application/vnd.schemaregistry.v1+json, application/json"},
                stream=True,
                verify=self._verify,
            )
            content = response.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
        except requests.Timeout as e:
            raise RegistryUnavailable(
                self._redacted(f"schema registry timed out after {self.timeout}s: GET {url}: {e}")
            ) from e
        except requests.RequestException as e:
            raise RegistryUnavailable(self._redacted(f"schema registry unreachable: GET {url}: {e}")) from e
        status = response.status_code
        if len(content) > MAX_RESPONSE_BYTES:
            raise _Permanent(
                "writer_schema_too_large", f"{what}: the registry's answer is over {MAX_RESPONSE_BYTES} bytes"
            )
        response._content = content  # what .json() and .text read
        try:
            body = response.json()
        except ValueError:
            body = None
        if status == 404:
            if isinstance(body, dict) and ("error_code" in body or "not found" in str(body).lower()):
                raise DecodeError(
                    "unknown_schema_id",
                    self._redacted(
                        f"{what} not found in the registry at {self.url} "
                        f"(error_code {body.get('error_code')}: {body.get('message')})"
                    ),
                )
            # A 404 that is not the registry's own answer: most likely a wrong base URL
            # (e.g. missing /apis/ccompat/v7). Not the message's fault.
            raise RegistryUnavailable(
                self._redacted(
                    f"GET {url} -> 404 without a registry error body ({_short(response.text)}); "
                    "is the registry URL right?"
                )
            )
        if status != 200:
            raise RegistryUnavailable(self._redacted(f"GET {url} -> HTTP {status}: {_short(response.text)}"))
        if not isinstance(body, dict):
            raise RegistryUnavailable(
                self._redacted(f"GET {url} -> 200 but not a JSON object: {_short(response.text)}")
            )
        return body


class _Permanent(Exception):
    """A schema that will never decode; cached, and raised to callers as a DecodeError."""

    def __init__(self, error_class: str, reason: str) -> None:
        super().__init__(reason)
        self.error_class = error_class
        self.reason = reason


def _reveal(value: SecretStr | str | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
