"""The migrations' DDL for a sharded ClickHouse cluster (``CDC_CLICKHOUSE_CLUSTER``).

The migration files describe one server. On a cluster, each statement becomes what every node
needs, by rule rather than by a list of tables, so later migration files follow too:

* ``CREATE TABLE t (…) ENGINE = <…>MergeTree…`` → the shard-local table ``t_local`` with the
  same columns, and ``t`` as ``Distributed(<cluster>, currentDatabase(), t_local[, _partition])``:
  readers keep their names and columns. A table with a ``_partition`` column gets it as the
  sharding key, which routes an insert through ``t`` to the shard the consumer writes that Kafka
  partition to (``_partition % shards``, consumer.sink.shards).
* ``CREATE MATERIALIZED VIEW … TO a AS SELECT … FROM f`` → the same view reading and writing the
  locals: each shard aggregates its own inserts, and readers re-aggregate across shards through
  the Distributed ``a`` (the aggregate's states are additive sums).
* ``CREATE [OR REPLACE] VIEW`` (the ``kpi_*`` views) → unchanged: they read the Distributed
  tables, so sums add up over every shard and ``FINAL`` runs on each shard (right, because a
  dimension key always lives on one shard: see DESIGN.md).
* ``ALTER TABLE t`` → on ``t_local``; a column change also on ``t``. ``DROP TABLE t`` → both.

Without Keeper (``replicated`` off) each node gets these statements one by one. With
``replicated`` the locals are ``Replicated*MergeTree`` with ``{shard}``/``{replica}`` macros
and every statement is ``ON CLUSTER``, sent once. That form is checked only as text (ClickHouse's
``formatQuery``, tests/unit/test_cluster_ddl.py): chdb-core cannot run Keeper.

Statements of another kind are refused (a clear error rather than a guess at what a cluster needs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

LOCAL_SUFFIX = "_local"
SHARDING_COLUMN = "_partition"

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_IDENTIFIER_RE = re.compile(rf"^{_IDENTIFIER}$")
_CREATE_TABLE_RE = re.compile(rf"^(CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?)({_IDENTIFIER})(\s*\()", re.I)
_CREATE_VIEW_RE = re.compile(
    rf"^(CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?)({_IDENTIFIER})(\s)", re.I
)
_CREATE_MV_RE = re.compile(rf"^(CREATE\s+MATERIALIZED\s+VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?)({_IDENTIFIER})(\s)", re.I)
_ALTER_RE = re.compile(rf"^(ALTER\s+TABLE\s+)({_IDENTIFIER})(\s)", re.I)
_DROP_RE = re.compile(rf"^(DROP\s+(?:TABLE|VIEW)\s+(?:IF\s+EXISTS\s+)?)({_IDENTIFIER})(\s*)$", re.I)
_ENGINE_RE = re.compile(
    r"\bENGINE\s*=\s*(Replacing|Summing|Aggregating|Collapsing|VersionedCollapsing|)MergeTree\b(\s*\(\s*(\))?)?", re.I
)
_LEADING_COMMENTS_RE = re.compile(r"\A(?:\s*--[^\n]*(?:\n|\Z))*")
_COLUMN_ALTER_RE = re.compile(r"^\s*(ADD|DROP|MODIFY|RENAME|COMMENT)\s+COLUMN\b", re.I)


class ClusterDDLError(ValueError):
    """A migration statement this module does not know how to spread over a cluster."""


@dataclass(frozen=True)
class ClusterLayout:
    """Where the migrations go: the cluster's name (in every node's remote_servers) and whether
    its locals are replicated through Keeper."""

    name: str
    replicated: bool = False

    def __post_init__(self) -> None:
        if not _IDENTIFIER_RE.match(self.name):
            raise ValueError(f"CDC_CLICKHOUSE_CLUSTER must be a plain identifier, not {self.name!r}")

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER `{self.name}`" if self.replicated else ""


def local_name(table: str) -> str:
    return table + LOCAL_SUFFIX


def sharded_tables(statements: Iterable[str]) -> set[str]:
    """The tables of these statements that become a local plus a Distributed table: every
    MergeTree-family table they create."""
    found = set()
    for statement in map(_without_leading_comments, statements):
        match = _CREATE_TABLE_RE.match(statement)
        if match and _ENGINE_RE.search(statement):
            found.add(match.group(2))
    return found


def cluster_statements(statement: str, sharded: set[str], layout: ClusterLayout) -> list[str]:
    """The statements a cluster runs for one migration statement, in order. `sharded`: every
    table of all migration files that is a local plus a Distributed table (sharded_tables)."""
    statement = _without_leading_comments(statement)
    if match := _CREATE_TABLE_RE.match(statement):
        return _create_table(statement, match, sharded, layout)
    if match := _CREATE_MV_RE.match(statement):
        return [_with_locals(_on_cluster(statement, match, layout), sharded)]
    if match := _CREATE_VIEW_RE.match(statement):
        return [_on_cluster(statement, match, layout)]
    if match := _ALTER_RE.match(statement):
        return _alter(statement, match, sharded, layout)
    if match := _DROP_RE.match(statement):
        table = match.group(2)
        dropped = [_on_cluster(statement, match, layout)]
        if table in sharded:
            dropped.append(_renamed(statement, match, local_name(table), layout))
        return dropped
    raise ClusterDDLError(f"cluster mode cannot spread this statement over the shards: {statement[:80]!r}…")


def _without_leading_comments(statement: str) -> str:
    return _LEADING_COMMENTS_RE.sub("", statement).strip()


def _create_table(statement: str, match: re.Match, sharded: set[str], layout: ClusterLayout) -> list[str]:
    table = match.group(2)
    if table not in sharded:
        return [_on_cluster(statement, match, layout)]
    local = local_name(table)
    local_statement = _renamed(statement, match, local, layout)
    if layout.replicated:
        local_statement = _ENGINE_RE.sub(lambda m: _replicated_engine(m, local), local_statement, count=1)
    columns = statement[match.end() :]
    sharding_key = f", {SHARDING_COLUMN}" if re.search(rf"^\s*{SHARDING_COLUMN}\s", columns, re.M) else ""
    distributed = (
        f"{match.group(1)}`{table}`{layout.on_cluster} AS `{local}`\n"
        f"ENGINE = Distributed('{layout.name}', currentDatabase(), '{local}'{sharding_key})"
    )
    return [local_statement, distributed]


def _replicated_engine(match: re.Match, local: str) -> str:
    """`ENGINE = XMergeTree[(args)]` → `ENGINE = ReplicatedXMergeTree('<path>', '{replica}'[, args])`."""
    keeper = f"'/clickhouse/tables/{{shard}}/{{database}}/{local}', '{{replica}}'"
    opened, closed = match.group(2), match.group(3)
    tail = ")" if not opened or closed else ", "
    return f"ENGINE = Replicated{match.group(1)}MergeTree({keeper}{tail}"


def _alter(statement: str, match: re.Match, sharded: set[str], layout: ClusterLayout) -> list[str]:
    table = match.group(2)
    if table not in sharded:
        return [_on_cluster(statement, match, layout)]
    altered = [_renamed(statement, match, local_name(table), layout)]
    if _COLUMN_ALTER_RE.match(statement[match.end() :]):
        altered.append(_on_cluster(statement, match, layout))
    return altered


def _on_cluster(statement: str, match: re.Match, layout: ClusterLayout) -> str:
    return _renamed(statement, match, match.group(2), layout)


def _renamed(statement: str, match: re.Match, name: str, layout: ClusterLayout) -> str:
    return f"{match.group(1)}`{name}`{layout.on_cluster}{match.group(3)}{statement[match.end() :]}"


def _with_locals(statement: str, sharded: set[str]) -> str:
    """Every sharded table the statement names, as its local (a view runs on each shard)."""
    if not sharded:
        return statement
    names = "|".join(sorted(map(re.escape, sharded), key=len, reverse=True))
    return re.sub(
        rf"(?<![A-Za-z0-9_`.])`?({names})`?(?![A-Za-z0-9_`])", lambda m: f"`{local_name(m.group(1))}`", statement
    )
