"""Walking Avro writer schemas of Debezium envelopes, for both lanes: the Python decoder compiles
its per-column plans from them (consumer.decode.envelope), the ClickHouse lane its staging table
(consumer.sink.server_plan). Both find named types, unions and the `before`/`after` records here.

A schema is JSON-shaped (dicts, lists, strings), as parsed by fastavro or as sent by the registry.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "fields_by_name",
    "image_records",
    "is_optional",
    "named_types",
    "only_branch",
    "record_of",
    "resolve",
    "strip",
]

_NAMED_KINDS = ("record", "enum", "fixed")
_NESTED = ("type", "items", "values", "fields")


def strip(node: Any) -> Any:
    """A fastavro-parsed schema back to plain Avro JSON (its bookkeeping keys removed)."""
    if isinstance(node, list):
        return [strip(n) for n in node]
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if not k.startswith("__")}
    return node


def named_types(schema: Any) -> dict[str, Any]:
    """Every named type (record, enum, fixed) a schema defines or, when fastavro parsed it, knows
    from the schemas it references: by its name and, when that is not qualified, its full name."""
    named: dict[str, Any] = {}
    if isinstance(schema, dict):
        named.update(schema.get("__named_schemas") or {})
    _collect(schema, named)
    return named


def _collect(node: Any, named: dict[str, Any]) -> None:
    if isinstance(node, list):
        for n in node:
            _collect(n, named)
    elif isinstance(node, dict):
        name = node.get("name")
        if node.get("type") in _NAMED_KINDS and isinstance(name, str):
            named.setdefault(name, node)
            if node.get("namespace") and "." not in name:
                named.setdefault(f"{node['namespace']}.{name}", node)
        for key in _NESTED:
            if key in node:
                _collect(node[key], named)


def resolve(node: Any, named: dict[str, Any]) -> Any:
    """The definition of a named type; any other node as it is."""
    if isinstance(node, str):
        return named.get(node, node)
    return node


def only_branch(union: list[Any]) -> Any | None:
    """The one branch of a union besides "null"; None when it has several."""
    branches = [b for b in union if b != "null"]
    return branches[0] if len(branches) == 1 else None


def is_optional(union: list[Any]) -> bool:
    """Whether a union is exactly ["null", T] or [T, "null"], the form Debezium writes."""
    return len(union) == 2 and "null" in union and only_branch(union) is not None


def record_of(node: Any, named: dict[str, Any]) -> dict[str, Any] | None:
    """The record schema a field holds: inline, by name, or the only record among the non-null
    branches of a union; None when it holds no record."""
    if isinstance(node, list):
        records = [r for r in (record_of(b, named) for b in node if b != "null") if r]
        return records[0] if len(records) == 1 else None
    node = resolve(node, named)
    return node if isinstance(node, dict) and node.get("type") == "record" else None


def fields_by_name(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in record.get("fields") or ()}


def image_records(envelope: dict[str, Any], named: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """The record schemas of a Debezium envelope's `before` and `after` images (None for an image
    the envelope lacks or that holds no record)."""
    fields = fields_by_name(envelope)
    before, after = (fields.get(side) for side in ("before", "after"))
    return (
        record_of(before["type"], named) if before else None,
        record_of(after["type"], named) if after else None,
    )
