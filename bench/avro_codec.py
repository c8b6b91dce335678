"""A fast Avro binary encoder compiled from a writer schema, for producing benchmark messages.

fastavro's `schemaless_writer` costs about 20 µs per Debezium envelope here, i.e. 40 s for the
default 2 million events. This module compiles a writer schema (the JSON the registry holds) into a
Python function once; the function writes the same bytes (checked against fastavro and against
real Debezium messages by `bench/run.py` before producing). Input is what fastavro's reader
returns (dicts, None for a null branch), except that a decimal may also be given as its unscaled
int, which is what the generator has at hand.

Only the subset of Avro that Debezium's AvroConverter writes for the benchmark's tables is
supported: record, union, null, boolean, int, long, float, double, string, bytes (with or
without logicalType decimal), and named references. Anything else raises at compile time.
"""

from __future__ import annotations

import struct
from decimal import Decimal
from typing import Any

from consumer.sink.server_plan import encode_string, zigzag_varint


def unscaled_bytes(unscaled: int) -> bytes:
    """Big-endian two's complement, minimal length: Java's BigInteger.toByteArray()."""
    bits = unscaled.bit_length() if unscaled >= 0 else (~unscaled).bit_length()
    return unscaled.to_bytes(bits // 8 + 1, "big", signed=True)


def encode_decimal(value: int | Decimal, scale: int) -> bytes:
    if type(value) is not int:
        scaled = Decimal(value).scaleb(scale)
        if scaled != scaled.to_integral_value():
            raise ValueError(f"{value} has more than {scale} decimal places")
        value = int(scaled)
    b = unscaled_bytes(value)
    return zigzag_varint(len(b)) + b


class _Compiler:
    def __init__(self) -> None:
        self.named: dict[str, Any] = {}
        self.lines: list[str] = []
        self.counter = 0

    def var(self) -> str:
        self.counter += 1
        return f"v{self.counter}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def register(self, schema: dict[str, Any], namespace: str | None) -> tuple[str, str | None]:
        name = schema["name"]
        ns = schema.get("namespace", namespace)
        full = name if "." in name or not ns else f"{ns}.{name}"
        self.named[full] = schema
        self.named.setdefault(name, schema)
        return full, (full.rsplit(".", 1)[0] if "." in full else None)

    def resolve(self, name: str, namespace: str | None) -> Any:
        for candidate in (f"{namespace}.{name}" if namespace else None, name):
            if candidate and candidate in self.named:
                return self.named[candidate]
        raise ValueError(f"unknown named type {name!r}")

    def compile(self, schema: Any, expr: str, indent: int, namespace: str | None) -> None:
        if isinstance(schema, str):
            if schema in ("null",):
                return
            if schema in ("long", "int"):
                self.emit(indent, f"out.append(zz({expr}))")
                return
            if schema == "string":
                self.emit(indent, f"out.append(enc_str({expr}))")
                return
            if schema == "bytes":
                v = self.var()
                self.emit(indent, f"{v} = {expr}")
                self.emit(indent, f"out.append(zz(len({v}))); out.append({v})")
                return
            if schema == "boolean":
                self.emit(indent, f"out.append(b'\\x01' if {expr} else b'\\x00')")
                return
            if schema == "double":
                self.emit(indent, f"out.append(pack_d({expr}))")
                return
            if schema == "float":
                self.emit(indent, f"out.append(pack_f({expr}))")
                return
            self.compile(self.resolve(schema, namespace), expr, indent, namespace)
            return
        if isinstance(schema, list):
            self.compile_union(schema, expr, indent, namespace)
            return
        kind = schema["type"]
        if kind == "record":
            _full, ns = self.register(schema, namespace)
            v = self.var()
            self.emit(indent, f"{v} = {expr}")
            for field in schema["fields"]:
                self.compile(field["type"], f"{v}[{field['name']!r}]", indent, ns)
            return
        if kind == "bytes" and schema.get("logicalType") == "decimal":
            self.emit(indent, f"out.append(enc_dec({expr}, {int(schema.get('scale', 0))}))")
            return
        if kind in ("string", "long", "int", "bytes", "boolean", "double", "float", "null"):
            self.compile(kind, expr, indent, namespace)
            return
        raise ValueError(f"unsupported Avro type {kind!r} for the benchmark encoder")

    def compile_union(self, branches: list[Any], expr: str, indent: int, namespace: str | None) -> None:
        non_null = [i for i, b in enumerate(branches) if b != "null"]
        if "null" not in branches or len(non_null) != 1 or len(branches) != 2:
            raise ValueError(f"only [null, T] / [T, null] unions are supported, not {branches}")
        null_index = branches.index("null")
        index = non_null[0]
        v = self.var()
        self.emit(indent, f"{v} = {expr}")
        self.emit(indent, f"if {v} is None:")
        self.emit(indent + 1, f"out.append({zigzag_varint(null_index)!r})")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"out.append({zigzag_varint(index)!r})")
        self.lines.append("    " * (indent + 1) + "pass")
        self.compile(branches[index], v, indent + 1, namespace)


def compile_encoder(schema: Any):
    """A function `encode(record) -> bytes` writing `record` (fastavro-reader shaped) in Avro binary."""
    compiler = _Compiler()
    compiler.emit(0, "def encode(record):")
    compiler.emit(1, "out = []")
    compiler.compile(schema, "record", 1, None)
    compiler.emit(1, "return b''.join(out)")
    scope = {
        "zz": zigzag_varint,
        "enc_str": encode_string,
        "enc_dec": encode_decimal,
        "pack_d": struct.Struct("<d").pack,
        "pack_f": struct.Struct("<f").pack,
    }
    exec(compile("\n".join(compiler.lines), "<avro-encoder>", "exec"), scope)  # our own generated code
    return scope["encode"]
