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


def hide_password(url: str) -> str:
    """One URL as given (any scheme, or none, spaces and all) with everything between its user
    name and its last "@" replaced by `***`: for a URL that `redact_url`'s pattern may not
    recognise, such as one with a bad scheme or an unescaped space in the password."""
    userinfo, at, rest = url.rpartition("@")
    if not at:
        return url
    scheme, separator, credentials = userinfo.rpartition("://")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{separator}{user}:{REDACTED}@{rest}"


def redact_secrets(text: str, *secrets: str | None) -> str:
    """`text` through `redact_url`, with every occurrence of the given secrets (a URL as given, a
    password) replaced too: whatever a library made of them, they are not in it."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, hide_password(secret) if "@" in secret else REDACTED)
    return redact_url(text)
