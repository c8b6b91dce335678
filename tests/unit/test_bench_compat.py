"""The benchmark's byte-compatibility check on a stack whose topics hold poison: the real
Debezium envelopes captured in test_decode are compared, anything else is skipped and counted."""

from __future__ import annotations

import json

import requests

from bench.events import CompatReport, check_against_real, debezium_placed, murmur2_partition
from tests.unit.test_decode import CAPTURED, CAPTURED_SCHEMAS


def _schema(schema_id: int) -> dict:
    if schema_id not in CAPTURED_SCHEMAS:
        # What the registry answers for an id it never issued (the bench's registry_schema raises it).
        response = requests.Response()
        response.status_code = 404
        raise requests.HTTPError(f"404 Client Error: /schemas/ids/{schema_id}", response=response)
    return json.loads(CAPTURED_SCHEMAS[schema_id])


def test_poison_messages_are_skipped_and_counted_and_real_ones_still_compared():
    real = [(name.split("_", 1)[0], None, value) for name, value in CAPTURED.items()]
    good_id = int.from_bytes(real[0][2][1:5], "big")
    poison = [
        ("campaign", None, b'{"not": "avro"}'),  # a JSON producer on the topic
        ("campaign", None, b"\x00" + (1734439522).to_bytes(4, "big") + b"\x02"),  # an id nobody issued
        ("campaign", None, b"\x00" + good_id.to_bytes(4, "big")),  # a known id, no body
        ("campaign", b"\x07", real[0][2]),  # a key that is not the wire format
    ]
    report = CompatReport()

    compared = check_against_real(poison[:2] + real + poison[2:], _schema, report, "stack")

    assert report.skipped == {
        "stack: not the wire format": 2,
        "stack: unknown schema id": 1,
        "stack: body unreadable with its schema": 1,
    }
    assert compared == real
    assert report.ok
    assert len(report.checked) == len(real)


def test_the_partitioner_check_leaves_out_records_another_producer_placed():
    """tests/faults/test_hostile_stack.py produces keys like b"hostile-3" with librdkafka's own
    partitioner: counted and left out, while Connect's keys (the wire format) are all checked."""
    key = CAPTURED["impressions_create"][:5] + b"\x02"  # a wire-format header, any body
    connect = [("adtech.public.advertiser", murmur2_partition(key, 4), key), ("adtech.public.advertiser", 1, None)]
    hostile = [("adtech.public.advertiser", 3, b"hostile-3"), ("adtech.public.impressions", 0, b"\x07")]
    report = CompatReport()

    placed = debezium_placed(hostile[:1] + connect + hostile[1:], report, "stack Debezium")

    assert placed == connect
    assert report.skipped == {"stack Debezium: a key not in the wire format, left out of the partitioner check": 2}
