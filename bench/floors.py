"""Phase 4, the floors, each in a process of its own (run by bench/run.py):

    python bench/floors.py consume --bootstrap B --topics T1,T2 --events N
    python bench/floors.py decode  --bootstrap B --topics T1,T2 --events N --registry URL

`consume`: a consumer configured like consumer/kafka/source.py (read_committed, cooperative-sticky,
`consume(10_000)` batches) reads every message and touches its value: the price of getting the
bytes out of Kafka into Python. `decode`: the same plus our decoder (`EnvelopeDecoder.decode`,
fastavro with the registry's writer schemas) on every message, no insert. `decode-map` adds the
mapping stage (`Mapper.rows`). Prints one JSON object; timing starts at the first message, so
start-up and the group join are not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from bench.kafka_util import end_offsets  # noqa: E402


def run(mode: str, bootstrap: str, topics: list[str], events: int, registry: str | None, prefix: str) -> dict:
    ends = end_offsets(bootstrap, topics)
    decoder = mapper = mapping = None
    if mode in ("decode", "decode-map"):
        from consumer.decode.envelope import EnvelopeDecoder
        from consumer.decode.registry import SchemaRegistry

        decoder = EnvelopeDecoder(SchemaRegistry(registry))
    if mode == "decode-map":
        from consumer.transform.mapping import Mapper, load_mapping

        mapping = load_mapping(topic_prefix=prefix)
        mapper = Mapper(mapping)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-floor-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.partition.eof": False,
        }
    )
    consumer.subscribe(topics)
    messages = 0
    nbytes = 0
    changes = 0
    first_wall = first_cpu = None
    remaining = {p: end for p, end in ends.items() if end > 0}
    try:
        while remaining:
            batch = consumer.consume(10_000, timeout=0.2)
            if not batch:
                continue
            if first_wall is None:
                first_wall, first_cpu = time.monotonic(), time.process_time()
            for m in batch:
                if m.error() is not None:
                    continue
                value = m.value()
                messages += 1
                if value is not None:
                    nbytes += len(value)
                    if decoder is not None:
                        event = decoder.decode(value)
                        if event is not None:
                            changes += 1
                            if mapper is not None:
                                table = mapping.for_topic(m.topic())
                                mapper.rows(table, event, tiebreak=m.offset())
            # Done when every partition's position reached its end (past transaction markers).
            for tp in consumer.position([TopicPartition(t, p) for t, p in list(remaining)]):
                key = (tp.topic, tp.partition)
                if tp.offset >= remaining[key]:
                    del remaining[key]
        wall = time.monotonic() - first_wall
        cpu = time.process_time() - first_cpu
    finally:
        consumer.close()
    return {
        "mode": mode,
        "messages": messages,
        "events": events,
        "changes_decoded": changes,
        "bytes": nbytes,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "events_per_s": round(events / wall, 1),
        "events_per_cpu_s": round(events / cpu, 1) if cpu else None,
        "cpu_s_per_million": round(cpu * 1e6 / events, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["consume", "decode", "decode-map"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topics", required=True)
    parser.add_argument("--events", type=int, required=True, help="change events in the topics (for per-event figures)")
    parser.add_argument("--registry", default=None)
    parser.add_argument("--prefix", default="adtech")
    args = parser.parse_args()
    print(json.dumps(run(args.mode, args.bootstrap, args.topics.split(","), args.events, args.registry, args.prefix)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
