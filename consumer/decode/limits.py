"""How much structure one message may make the decoder build: nesting depth and decimal scale.

Both are chosen by whoever produces to a topic or registers a schema, and both cost memory or
stack without bound otherwise: a 100,000-deep JSON value overflows the interpreter's stack, a
Connect Decimal of scale 10^12 asks for a number of 10^12 digits. Past a limit the message is
poison (`DecodeError`) with a class of its own.

* `MAX_DEPTH` = 64 levels of JSON objects and arrays. A Debezium envelope is 3 deep, its Connect
  schema 4 to 6, an Avro writer schema of a table with nested records some 10 per record level;
  64 leaves room for every real one and stays far below the interpreter's recursion limit.
* `MAX_DECIMAL_SCALE` = 1000 decimal places (either sign). PostgreSQL's NUMERIC has at most
  16,383 digits after the point, but a column with more than ClickHouse's 76 cannot be stored
  anyway; 1000 keeps every decimal a few hundred bytes.
"""

from __future__ import annotations

from typing import Any

from consumer.core.errors import DecodeError

__all__ = ["MAX_DECIMAL_SCALE", "MAX_DEPTH", "check_depth", "check_scale", "may_be_deeper"]

MAX_DEPTH = 64
MAX_DECIMAL_SCALE = 1000


def may_be_deeper(text: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text opens enough objects and arrays to nest beyond `limit` (a cheap test
    that spares `check_depth` for almost every message)."""
    return text.count(b"{") + text.count(b"[") > limit


def check_depth(node: Any, what: str, limit: int = MAX_DEPTH) -> None:
    """DecodeError("too_deep") when dicts and lists nest in `node` beyond `limit` levels; walked
    with a stack of its own, never by recursion."""
    pending = [(node, 1)] if isinstance(node, dict | list) else []
    while pending:
        current, depth = pending.pop()
        if depth > limit:
            raise DecodeError("too_deep", f"{what} nests objects and arrays more than {limit} deep")
        children = current.values() if isinstance(current, dict) else current
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def check_scale(scale: Any, what: str) -> int:
    """The decimal scale when it is an integer within ±MAX_DECIMAL_SCALE; DecodeError otherwise."""
    if type(scale) is not int:
        raise DecodeError("bad_decimal_scale", f"{what}: decimal scale {scale!r} is not an integer")
    if not -MAX_DECIMAL_SCALE <= scale <= MAX_DECIMAL_SCALE:
        raise DecodeError("decimal_scale_out_of_range", f"{what}: decimal scale {scale} is beyond ±{MAX_DECIMAL_SCALE}")
    return scale
