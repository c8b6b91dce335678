"""A valid change of another table in a topic (e.g. a click produced into the impressions topic)
is dead-lettered as `table_mismatch`, never mapped onto this topic's table — a click has every
column of an impression, so without the check it would silently count as one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.core.errors import MappingError
from consumer.decode.envelope import EnvelopeDecoder
from consumer.decode.registry import parse_writer_schema
from consumer.sink.server_plan import Unsupported, compile_plan
from consumer.transform.mapping import DEFAULT_MAPPING, Mapper, load_mapping

ENVELOPES = Path(__file__).parents[1] / "fixtures" / "envelopes"
MAPPING = load_mapping()
IMPRESSIONS = MAPPING.for_topic("adtech.public.impressions")
CLICKS = MAPPING.for_topic("adtech.public.clicks")


class FixtureRegistry:
    def __init__(self, fixture: dict):
        self.fixture = fixture

    def schema(self, schema_id: int) -> dict:
        assert schema_id == self.fixture["schema_id"]
        return parse_writer_schema(self.fixture["schema"])


def click() -> tuple[dict, object]:
    fixture = json.loads((ENVELOPES / "clicks_c.json").read_text())
    event = EnvelopeDecoder(FixtureRegistry(fixture)).decode(bytes.fromhex(fixture["value_hex"]))
    return fixture, event


def test_a_click_in_the_impressions_topic_is_a_table_mismatch() -> None:
    _, event = click()
    assert Mapper(MAPPING).rows(CLICKS, event, tiebreak=1)  # in its own topic: fine
    with pytest.raises(MappingError) as caught:
        Mapper(MAPPING).rows(IMPRESSIONS, event, tiebreak=1)
    assert caught.value.error_class == "table_mismatch"
    assert "'clicks'" in str(caught.value) and "adtech.public.impressions" in str(caught.value)


def test_the_source_table_can_be_named_in_the_mapping(tmp_path) -> None:
    text = DEFAULT_MAPPING.read_text()
    text = text.replace(
        'topic = "{prefix}.public.clicks"', 'topic = "{prefix}.routed.all_clicks"\nsource_table = "clicks"'
    )
    path = tmp_path / "mapping.toml"
    path.write_text(text)
    routed = load_mapping(path).for_topic("adtech.routed.all_clicks")
    assert routed.expected_table == "clicks"
    assert Mapper(MAPPING).rows(routed, click()[1], tiebreak=1)


def test_the_fast_lane_leaves_another_tables_schema_to_the_python_path() -> None:
    fixture, _ = click()
    writer = parse_writer_schema(fixture["schema"])
    assert compile_plan(CLICKS, fixture["schema_id"], writer, "__debezium_unavailable_value")
    with pytest.raises(Unsupported, match="not of table 'impressions'"):
        compile_plan(IMPRESSIONS, fixture["schema_id"], writer, "__debezium_unavailable_value")
