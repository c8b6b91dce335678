"""Which ClickHouse shard each Kafka partition's rows go to, and the shards' sinks.

Every Kafka partition is written to exactly one shard, `partition % shards` (the same for every
topic): its rows, and so its applied watermark, live on that shard alone, and each insert is one
block on one server, as on a single server (DESIGN.md, "Exactly once on a cluster"). The
Distributed tables shard by `_partition` (consumer.sink.cluster_ddl), which gives the same shard
for the same partition when the cluster's shards have equal weights: a row inserted through them
lands where the consumer would have written it.

A dimension key always arrives in the same Kafka partition (Debezium keys the message by the
primary key), so it has one shard and `FINAL` per shard is `FINAL` over the cluster — as long as
the dimension topics keep their partition count (more partitions move keys).

One server is one shard: the engine needs no other case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consumer.ops import metrics
from consumer.sink.clickhouse import ClickHouseSink

PING_TIMEOUT_S = 2.0


class Shards:
    def __init__(self, sinks: Sequence[ClickHouseSink]):
        if not sinks:
            raise ValueError("at least one ClickHouse shard")
        self.sinks = list(sinks)
        self.down: set[int] = set()
        for shard in range(len(self.sinks)):
            metrics.clickhouse_shard_up.labels(self.label(shard)).set(1)

    def __len__(self) -> int:
        return len(self.sinks)

    def of(self, partition: int) -> int:
        """The shard (0-based) that holds Kafka partition `partition`'s rows."""
        return partition % len(self.sinks)

    def sink(self, partition: int) -> ClickHouseSink:
        return self.sinks[self.of(partition)]

    @staticmethod
    def label(shard: int) -> str:
        """As ClickHouse numbers shards (system.clusters.shard_num): from 1."""
        return str(shard + 1)

    def answers(self, shard: int) -> bool:
        """A shard that failed is pinged (briefly) before an insert is tried on it again: a
        server that stopped answering then costs the consumer's loop seconds, not the whole
        request timeout, and the other shards' partitions keep their turn."""
        return shard not in self.down or self.sinks[shard].answers(PING_TIMEOUT_S)

    def reached(self, shard: int, up: bool) -> None:
        """An insert into `shard` returned (up) or failed (not up)."""
        if up:
            self.down.discard(shard)
        else:
            self.down.add(shard)
        metrics.clickhouse_shard_up.labels(self.label(shard)).set(1 if up else 0)

    def add_columns(self, table: str, columns: list[tuple[str, str]], evolved: bool = False) -> None:
        """On every shard in turn: the last shard to get them holds what all of them hold."""
        for sink in self.sinks:
            sink.add_columns(table, columns, evolved)


class ClusterMismatch(RuntimeError):
    """The shard URLs do not match the cluster's shards."""


def check_cluster(clients: Sequence[Any], cluster: str) -> None:
    """The i-th client must be a node of the cluster's shard i + 1, and the shards' weights equal,
    so that `partition % shards` here and the Distributed tables' `_partition` key agree."""
    shape = (
        clients[0]
        .query(
            "SELECT max(shard_num), min(shard_weight), max(shard_weight) FROM system.clusters WHERE cluster = {c:String}",
            parameters={"c": cluster},
        )
        .result_rows
    )
    shards, lightest, heaviest = shape[0] if shape and shape[0][0] else (0, 0, 0)
    if shards != len(clients):
        raise ClusterMismatch(f"cluster {cluster!r} has {shards} shard(s) but {len(clients)} URL(s) are given")
    if lightest != heaviest:
        raise ClusterMismatch(
            f"cluster {cluster!r}: shards of unequal weights ({lightest}..{heaviest}) route unlike `partition % shards`"
        )
    for index, client in enumerate(clients):
        local = client.query(
            "SELECT shard_num FROM system.clusters WHERE cluster = {c:String} AND is_local LIMIT 1",
            parameters={"c": cluster},
        ).result_rows
        if not local or local[0][0] != index + 1:
            found = local[0][0] if local else "none"
            raise ClusterMismatch(f"shard URL {index + 1} is a node of shard {found} of cluster {cluster!r}")
