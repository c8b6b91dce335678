"""Memory stays flat under a stream of distinct hostile messages: every cache a message can add to
is bounded (schema ids, embedded JSON schemas, the ClickHouse lane's plans by header).

CI runs 100,000 messages of each kind; CDC_HOSTILE_MESSAGES=1000000 runs the full million."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest

from consumer.core.errors import DecodeError
from consumer.decode.envelope import EnvelopeDecoder
from consumer.sink.server_plan import ServerDecoder
from consumer.transform.mapping import load_mapping

pytestmark = pytest.mark.slow

MESSAGES = int(os.environ.get("CDC_HOSTILE_MESSAGES", "100000"))
FLAT_BYTES = 8 * 2**20  # growth allowed between the first tenth of the stream and its end
IMPRESSIONS = load_mapping().for_topic("adtech.public.impressions")


class UnknownIds:
    """A registry that knows no schema id (as for Avro framing with random ids)."""

    def __init__(self):
        self.asked = 0

    def schema(self, schema_id: int):
        self.asked += 1
        raise DecodeError("unknown_schema_id", f"schema id {schema_id} not found")


def growth(feed) -> int:
    """Bytes still allocated after the whole stream, beyond what the first tenth left."""
    tracemalloc.start()
    try:
        feed(range(MESSAGES // 10))
        settled = tracemalloc.get_traced_memory()[0]
        feed(range(MESSAGES // 10, MESSAGES))
        return tracemalloc.get_traced_memory()[0] - settled
    finally:
        tracemalloc.stop()


def test_distinct_schema_ids_do_not_grow_the_decoder() -> None:
    decoder = EnvelopeDecoder(UnknownIds())

    def feed(ids) -> None:
        for i in ids:
            with pytest.raises(DecodeError):
                decoder.decode(b"\x00" + i.to_bytes(4, "big") + b"\x02x")

    assert growth(feed) < FLAT_BYTES


def test_distinct_embedded_json_schemas_do_not_grow_the_decoder() -> None:
    decoder = EnvelopeDecoder(None)
    row = {"type": "struct", "optional": True, "fields": [{"field": "id", "type": "int64"}]}

    def feed(ids) -> None:
        for i in ids:
            schema = {
                "type": "struct",
                "name": f"hostile{i}",
                "fields": [{"field": "before", **row}, {"field": "after", **row}, {"field": "op", "type": "string"}],
            }
            payload = {"op": "c", "before": None, "after": {"id": i}, "source": {"table": "impressions"}}
            decoder.decode(json.dumps({"schema": schema, "payload": payload}).encode())

    assert growth(feed) < FLAT_BYTES


def test_distinct_headers_do_not_grow_the_clickhouse_lane() -> None:
    registry = UnknownIds()
    server = ServerDecoder(client=None, writer_schema=registry.schema, placeholder="__debezium_unavailable_value")

    def feed(ids) -> None:
        for i in ids:
            assert server.plan(IMPRESSIONS, b"\x00" + i.to_bytes(4, "big")) is None

    assert growth(feed) < FLAT_BYTES
    assert registry.asked == MESSAGES, "each header asked once (the registry remembers unknown ids itself)"
