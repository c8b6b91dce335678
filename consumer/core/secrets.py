"""Keeping secrets out of what the consumer prints, raises, writes to the DLQ or exports.

Secrets travel as pydantic `SecretStr` (masked in any repr) and are revealed only where a client
is built. What remains is the URL with credentials in it (`https://user:password@host`, which
CDC_CLICKHOUSE_URL and CDC_SCHEMA_REGISTRY_URL accept): any text that may carry one — a URL
itself, an exception's message — goes through :func:`redact_url` before it is logged or raised.
"""

from __future__ import annotations

import re

REDACTED = "***"

# scheme://user:password@ — the password ends at the last "@" before whitespace, quotes or
# brackets, so a password holding an unescaped "@" or "/" is hidden whole (over-redacting a
# look-alike is the safe mistake).
_CREDENTIALS_IN_URL = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"<>]*:)[^\s'\"<>]*@")


def redact_url(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` in it replaced by `***`."""
    return _CREDENTIALS_IN_URL.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
