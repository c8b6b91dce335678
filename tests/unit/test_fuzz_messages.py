"""Property-based: real Debezium messages (tests/fixtures/envelopes, Avro in Confluent wire format
and JsonConverter JSON), mutated by hypothesis, against the real decoder (with the real registry
client, over HTTP), mapper and, for pipeline runs, sink on an embedded ClickHouse (chDB).

* decode + map raise nothing but `Poison` (the one thing the pipeline dead-letters);
* a pipeline run with hostile messages (the catalogue of tests/hostile_messages.py and random
  mutants) between valid ones commits everything, applies every valid message, dead-letters every
  catalogued one with its class and every mutant the mapper refuses with the mapper's class.

CI runs fixed seeds (derandomized, a few hundred cases, seconds); the `slow` tests run
CDC_FUZZ_CASES cases of decode + map and a tenth as many pipeline messages: 10,000 by default (what
`make test` and CI run, ~30 s), `CDC_FUZZ_CASES=100000` on demand (~4.5 min here).
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.core.errors import Poison
from consumer.decode.envelope import EnvelopeDecoder
from consumer.decode.registry import SchemaRegistry
from consumer.sink.clickhouse import EVOLVED_COMMENT, ClickHouseSink, connect
from consumer.sink.migrate import apply_migrations
from consumer.transform.mapping import Mapper, MappingError, NewColumns, load_mapping
from tests.fakes import LogSource, log_pipeline, run_until_committed
from tests.hostile_messages import (
    FRESH_IDS_FROM,
    INJECTIONS,
    catalogue,
    json_value,
    real_messages,
    schemaless,
    valid_changes,
)

CASES = int(os.environ.get("CDC_FUZZ_CASES", "10000"))
MAPPING = load_mapping()
REALS = real_messages()
TOPICS = {t.expected_table: t.topic for t in MAPPING.tables}
MAX_EVOLVED_COLUMNS = 8
_fresh_ids = count(FRESH_IDS_FROM)
_partitions = count(1)


class Registry:
    """A Confluent-compatible registry over HTTP holding the fixtures' writer schemas, and any
    registered later; 404 with the registry's error body for other ids."""

    def __init__(self):
        self.schemas = {r.schema_id: r.raw_schema for r in REALS}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                schema_id = self.path.rsplit("/", 1)[-1]
                schema = outer.schemas.get(int(schema_id)) if schema_id.isdigit() else None
                status, body = (
                    (200, {"schema": schema}) if schema else (404, {"error_code": 40403, "message": "not found"})
                )
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def register(self, text: str) -> int:
        schema_id = 1_000 + len(self.schemas)
        self.schemas[schema_id] = text
        return schema_id

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    server = Registry()
    yield server
    server.close()


# -- mutations ------------------------------------------------------------------------------------
# Written once against a `Choices` (hypothesis' draw, or a seeded random.Random for the slow runs'
# volume: hypothesis spends some 10 ms per case of its own, too long for 100,000 of them).

SEEDS = [(r.table, r.value) for r in REALS] + [(r.table, json_value(schemaless(r.record))) for r in REALS]


class Choices:
    """What a mutation asks for, from hypothesis (`draw`) or from random.Random (`rng`)."""

    def __init__(self, draw=None, rng: random.Random | None = None):
        self.draw, self.rng = draw, rng

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high)) if self.draw else self.rng.randint(low, high)

    def pick(self, options: list):
        return self.draw(st.sampled_from(options)) if self.draw else self.rng.choice(options)

    def binary(self, low: int, high: int) -> bytes:
        if self.draw:
            return self.draw(st.binary(min_size=low, max_size=high))
        return self.rng.randbytes(self.rng.randint(low, high))

    def text(self, size: int) -> str:
        if self.draw:
            return self.draw(st.text(max_size=size))
        return "".join(
            chr(self.rng.choice([self.rng.randint(32, 126), self.rng.randint(0, 0x10FFFF)]))
            for _ in range(self.rng.randint(0, size))
        )


def hostile_value(choose: Choices):
    kind = choose.pick(["none", "bool", "int", "edge", "float", "text", "special", "list", "dict", "deep"])
    if kind == "int":
        return choose.integer(-(2**130), 2**130)
    if kind == "edge":
        return choose.pick([2**63, -(2**63) - 1, 2**64, -1, 10**40, 0])
    if kind == "float":
        return choose.pick([float("nan"), float("inf"), -0.0, 1e308, 0.1])
    if kind == "text":
        return choose.text(20)
    if kind == "special":
        return choose.pick(["\ud800", "x\udfffy", "1E+999999999", "2300-01-01T00:00:00Z", "NaN", "", "0." + "1" * 40])
    if kind == "list":
        return [choose.integer(-5, 5) for _ in range(choose.integer(0, 3))]
    if kind == "dict":
        return {choose.text(5): choose.integer(-5, 5) for _ in range(choose.integer(0, 3))}
    if kind == "deep":
        depth = choose.integer(65, 250)
        return json.loads("[" * depth + "]" * depth)
    return {"none": None, "bool": True}[kind]


def _paths(node, path=()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            out.extend(_paths(child, (*path, key)))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            out.extend(_paths(child, (*path, i)))
    return out


def json_mutant(choose: Choices) -> tuple[str, bytes]:
    """A real change as JSON with some values replaced, keys added or removed."""
    real = choose.pick(REALS)
    envelope = json.loads(json_value(schemaless(real.record)), parse_float=Decimal)
    for _ in range(choose.integer(1, 3)):
        path = choose.pick(_paths(envelope))
        parent = envelope
        for step in path[:-1]:
            parent = parent[step]
        action = choose.pick(["set", "add", "delete"])
        if not path:
            envelope = hostile_value(choose) if action == "set" else envelope
        elif action == "set":
            parent[path[-1]] = hostile_value(choose)
        elif action == "add" and isinstance(parent, dict):
            key = choose.pick([choose.text(12), *INJECTIONS, "op", "after", "before", "source", "lsn", "id"])
            parent[key] = hostile_value(choose)
        elif isinstance(parent, dict):
            parent.pop(path[-1], None)
    return real.table, json.dumps(envelope, default=str).encode()


def byte_mutant(choose: Choices) -> tuple[str, bytes]:
    """A real message (Avro or JSON) with bytes flipped, cut, inserted or appended."""
    table, value = choose.pick(SEEDS)
    data = bytearray(value)
    for _ in range(choose.integer(1, 4)):
        at = choose.integer(0, max(0, len(data) - 1))
        action = choose.pick(["flip", "cut", "insert", "truncate", "append"])
        if action == "flip" and data:
            data[at] = choose.integer(0, 255)
        elif action == "cut":
            del data[at : at + choose.integer(1, 8)]
        elif action == "insert":
            data[at:at] = choose.binary(1, 8)
        elif action == "truncate":
            del data[at:]
        else:
            data += choose.binary(1, 16)
    return table, bytes(data)


def mutant(choose: Choices) -> tuple[str, bytes]:
    return choose.pick([json_mutant, byte_mutant])(choose)


MUTANTS = st.composite(lambda draw: mutant(Choices(draw=draw)))()


def random_mutants(seed: int, n: int) -> Iterator[tuple[str, bytes]]:
    choose = Choices(rng=random.Random(seed))
    return (mutant(choose) for _ in range(n))


# -- decode + map -----------------------------------------------------------------------------


class Oracle:
    """Decode + map as the pipeline does, evolution included (widened tables, the cap), without
    ClickHouse: what the pipeline must make of each message of a partition, in order."""

    def __init__(self, registry: Registry, sink: ClickHouseSink | None = None):
        self.decoder = EnvelopeDecoder(SchemaRegistry(registry.url, timeout=5))
        self.mapper = Mapper(load_mapping())
        self.sink = sink  # what earlier runs left in ClickHouse: evolved columns and their types
        self.evolved: dict[str, set[str]] = {}

    def outcome(self, table_name: str, value: bytes, offset: int) -> str | None:
        """The poison class, or None when the message maps to rows (or to none)."""
        table = self.mapper.mapping.for_topic(TOPICS[table_name])
        try:
            event = self.decoder.decode(value)
            if event is not None:
                self._map(table, event, offset)
        except Poison as exc:
            return exc.error_class
        return None

    def _map(self, table, event, offset: int) -> None:
        try:
            self.mapper.rows(table, event, offset)
        except NewColumns as change:
            stored = self.sink.columns(table.table) if self.sink else {}
            evolved = {name for name, (_, comment) in stored.items() if comment == EVOLVED_COMMENT}
            wanted = evolved | self.evolved.get(table.table, set()) | {c.name for c in change.columns}
            if len(wanted) > MAX_EVOLVED_COLUMNS:
                raise MappingError("too_many_new_columns", "over the cap") from None
            self.evolved[table.table] = wanted
            added = [c.of_type(stored[c.name][0]) if c.name in stored else c for c in change.columns]
            widened = change.table.with_columns(added)
            self.mapper.mapping = self.mapper.mapping.replaced(widened)
            self.mapper.rows(widened, event, offset)


@pytest.fixture(scope="module")
def oracle(registry) -> Oracle:
    """One for every case: its registry client keeps the schemas, as the consumer's does."""
    return Oracle(registry)


FAST = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@FAST
@given(mutant=MUTANTS)
def test_decode_and_map_raise_nothing_but_poison(oracle, mutant) -> None:
    oracle.outcome(*mutant, offset=7)  # anything but Poison propagates and fails the test


@pytest.mark.slow
def test_decode_and_map_raise_nothing_but_poison_over_many_cases(oracle) -> None:
    for table, value in random_mutants(seed=14, n=CASES):
        try:
            oracle.outcome(table, value, offset=7)
        except Exception as exc:
            raise AssertionError(f"{table}: {value[:300]!r}") from exc


def test_every_catalogued_hostile_message_is_poison_of_its_class(registry) -> None:
    hostile = catalogue(REALS, _fresh_ids, registry.register, max_evolved_columns=MAX_EVOLVED_COLUMNS)
    assert len(hostile) >= 12 and len({h.error_class for h in hostile}) >= 10
    for message in hostile:
        assert Oracle(registry).outcome(message.table, message.value, 1) == message.error_class, message.kind


# -- pipeline runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory):
    client = connect(None, embedded_path=tmp_path_factory.mktemp("chdb"))
    apply_migrations(client)
    # Older versions of a key merged away would hide that a valid change was applied.
    for table in ("dim_advertiser", "dim_campaign"):
        client.command(f"SYSTEM STOP MERGES {table}")
    yield client
    client.close()


def pipeline_run(registry: Registry, clickhouse, mutants: list[tuple[str, bytes]], with_catalogue: bool) -> None:
    """One partition per table (of numbers of this run's own), valid changes, the catalogue and
    `mutants` interleaved; then every message is where it must be."""
    valid = valid_changes(REALS, _fresh_ids)
    hostile = (
        [
            (h.table, h.value, h.error_class)
            for h in catalogue(REALS, _fresh_ids, registry.register, max_evolved_columns=MAX_EVOLVED_COLUMNS)
        ]
        if with_catalogue
        else []
    )
    queue = (
        [(t, v, "valid") for t, v in valid] + [(t, v, c) for t, v, c in hostile] + [(t, v, None) for t, v in mutants]
    )
    queue = [queue[i] for i in sorted(range(len(queue)), key=lambda i: (i * 7919) % len(queue))]  # interleaved
    partition = next(_partitions)
    logs: dict[tuple[str, int], list[bytes]] = {}
    expected: dict[tuple[str, int, int], tuple[str, str | None]] = {}
    sink = ClickHouseSink(clickhouse)
    oracle = Oracle(registry, sink)
    for table, value, expect in queue:
        log = logs.setdefault((TOPICS[table], partition), [])
        offset = len(log)
        log.append(value)
        predicted = oracle.outcome(table, value, offset)
        expected[(TOPICS[table], partition, offset)] = (expect, predicted)
        if expect == "valid":
            assert predicted is None, f"a valid change is refused: {predicted}"
        elif expect is not None:
            assert predicted == expect, (expect, predicted)

    source = LogSource(logs)
    pipeline = log_pipeline(
        source,
        EnvelopeDecoder(SchemaRegistry(registry.url, timeout=5)),
        sink,
        poison_breaker_min_messages=0,
        max_evolved_columns=MAX_EVOLVED_COLUMNS,
    )
    run_until_committed(pipeline, source)

    dead = {(r["source_topic"], r["partition"], r["offset"]): r["error_class"] for r in pipeline.dlq.sent}
    assert len(dead) == len(pipeline.dlq.sent), "each message dead-lettered once at most"
    applied = {
        (topic, int(p), int(o))
        for table in MAPPING.tables
        for topic, p, o in clickhouse.query(
            f"SELECT DISTINCT _topic, _partition, _offset FROM {table.table} WHERE _partition = {partition}"
        ).result_rows
    }
    for at, (expect, predicted) in expected.items():
        if expect == "valid":
            assert at in applied and at not in dead, (at, dead.get(at))
        elif predicted is not None:
            assert dead.get(at) == predicted and at not in applied, (at, expect, predicted, dead.get(at))
        else:  # a mutant that maps: applied, or refused by ClickHouse and dead-lettered as such
            assert at not in dead or dead[at] in ("clickhouse_refused", "previous_value_unknown"), (at, dead[at])


def test_a_pipeline_run_applies_every_valid_message_and_dead_letters_every_hostile_one(registry, clickhouse) -> None:
    pipeline_run(registry, clickhouse, [], with_catalogue=True)


@settings(FAST, max_examples=int(os.environ.get("CDC_FUZZ_PIPELINE_RUNS", "5")))
@given(mutants=st.lists(MUTANTS, min_size=1, max_size=40))
def test_pipeline_runs_with_random_mutants_between_valid_messages(registry, clickhouse, mutants) -> None:
    pipeline_run(registry, clickhouse, mutants, with_catalogue=False)


@pytest.mark.slow
def test_pipeline_runs_over_many_mutants(registry, clickhouse) -> None:
    mutants = list(random_mutants(seed=1414, n=CASES // 10))
    for start in range(0, len(mutants), 1_000):
        pipeline_run(registry, clickhouse, mutants[start : start + 1_000], with_catalogue=False)
