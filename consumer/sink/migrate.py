"""ClickHouse schema migrations and the consumer's applied watermarks.

Migrations are the files ``clickhouse/NNN_<name>.sql`` of the repository (installed as the package
``consumer.migrations``, so an installed wheel carries them), applied in numeric order
into the client's current database. Each file may hold several statements; they are split on a
``;`` that ends a line (outside quotes and comments). Applied files are recorded in
``_cdc_schema_migrations`` (name, checksum, applied_at); a file is recorded only after all of its
statements succeeded, so a file that failed half-way is re-run from its start next time — which is
why the DDL itself is idempotent (``IF NOT EXISTS`` / ``OR REPLACE``). Editing a file that was
already applied is an error (:class:`MigrationChecksumError`): schema changes go into a new file.

There is no lock: run one migrator at a time (the consumer runs it at start-up, before consuming).

:func:`applied_offsets` reads the "applied watermarks" (the highest Kafka offset per partition
already present in a target table) that make the consumer exactly-once; it lives here because it
depends on the ``_topic``/``_partition``/``_offset`` columns and the projection these migrations
define.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from consumer.core.identifiers import quote
from consumer.sink.cluster_ddl import ClusterLayout, cluster_statements, sharded_tables

logger = logging.getLogger(__name__)

MIGRATIONS_TABLE = "_cdc_schema_migrations"
DEFAULT_DIRECTORY = resources.files("consumer.migrations")

_FILE_RE = re.compile(r"^(\d+)_[A-Za-z0-9_.-]+\.sql$")

# Settings for the statements the runner sends itself: synchronous, and the bookkeeping row
# written exactly when the call returns.
_SYNC = {"async_insert": 0}


class MigrationError(RuntimeError):
    """A migration file could not be read, ordered or applied."""


class MigrationChecksumError(MigrationError):
    """An already applied migration file has been changed."""


@dataclass(frozen=True)
class Migration:
    name: str
    number: int
    path: Traversable
    sql: str
    checksum: str

    @property
    def statements(self) -> list[str]:
        return split_statements(self.sql)


def checksum(sql: str) -> str:
    """sha256 of the file text with line endings normalised (a CRLF checkout is the same file)."""
    return hashlib.sha256(sql.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def discover(directory: Traversable | None = None) -> list[Migration]:
    """The migration files of ``directory`` (a path, or the installed ones) in apply order (numeric prefix)."""
    directory = directory if directory is not None else DEFAULT_DIRECTORY
    if not directory.is_dir():
        raise MigrationError(f"migration directory {directory} does not exist")
    found: list[Migration] = []
    for path in sorted(directory.iterdir(), key=lambda entry: entry.name):
        if not path.is_file() or not path.name.endswith(".sql"):
            continue
        match = _FILE_RE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files must be named NNN_<name>.sql")
        sql = path.read_text(encoding="utf-8")
        found.append(Migration(path.name, int(match.group(1)), path, sql, checksum(sql)))
    found.sort(key=lambda m: (m.number, m.name))
    for before, after in itertools.pairwise(found):
        if before.number == after.number:
            raise MigrationError(f"two migrations share the number {before.number}: {before.name}, {after.name}")
    return found


def split_statements(sql: str) -> list[str]:
    """Split a SQL script into statements at every ``;`` that ends a line.

    A ``;`` only separates statements when nothing but whitespace or a ``--`` comment follows it on
    its line, and it is outside string literals, quoted identifiers and comments. Statements made
    only of comments are dropped; the returned statements have no trailing ``;``.
    """
    statements: list[str] = []
    start = 0
    i = 0
    n = len(sql)
    while i < n:
        ch = sql[i]
        if ch in ("'", '"', "`"):
            i = _skip_quoted(sql, i)
            continue
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            continue
        if sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise MigrationError("unterminated /* comment")
            i = end + 2
            continue
        if ch == ";" and _rest_of_line_is_blank(sql, i + 1):
            statements.append(sql[start:i])
            # The rest of the line (blank, or a trailing comment) belongs to this statement.
            end = sql.find("\n", i)
            i = start = n if end < 0 else end + 1
            continue
        i += 1
    statements.append(sql[start:])
    return [s.strip() for s in statements if _has_code(s)]


def _skip_quoted(sql: str, i: int) -> int:
    quote = sql[i]
    j = i + 1
    while j < len(sql):
        c = sql[j]
        if c == "\\":
            j += 2
            continue
        if c == quote:
            if j + 1 < len(sql) and sql[j + 1] == quote:  # doubled quote
                j += 2
                continue
            return j + 1
        j += 1
    raise MigrationError(f"unterminated quoted text starting with {sql[i : i + 40]!r}")


def _rest_of_line_is_blank(sql: str, i: int) -> bool:
    end = sql.find("\n", i)
    rest = (sql[i:] if end < 0 else sql[i:end]).strip()
    return not rest or rest.startswith("--")


def _has_code(statement: str) -> bool:
    for line in statement.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("--"):
            return True
    return False


def _ensure_migrations_table(client: Any) -> None:
    client.command(
        f"""
        CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
        (
            name       String,
            checksum   String,
            applied_at DateTime64(3, 'UTC')
        )
        ENGINE = ReplacingMergeTree(applied_at)
        ORDER BY name
        """,
        settings=_SYNC,
    )


def applied_migrations(client: Any) -> dict[str, str]:
    """name -> checksum of the migrations recorded in the client's database."""
    _ensure_migrations_table(client)
    rows = client.query(f"SELECT name, argMax(checksum, applied_at) FROM {MIGRATIONS_TABLE} GROUP BY name").result_rows
    return {name: digest for name, digest in rows}


def apply_migrations(
    client: Any, directory: Traversable | None = None, cluster: ClusterLayout | None = None
) -> list[str]:
    """Apply the migrations of ``directory`` not applied yet; return the names applied now.

    ``client`` is a clickhouse-connect client; everything goes into its current database. With
    a ``cluster``, each statement becomes its shard-local and Distributed forms
    (consumer.sink.cluster_ddl): run this once per node, or once in all with ``replicated``
    (the statements are then ON CLUSTER).
    """
    migrations = discover(directory)
    sharded = sharded_tables(s for m in migrations for s in m.statements) if cluster else set()
    done = applied_migrations(client)
    for migration in migrations:
        recorded = done.get(migration.name)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationChecksumError(
                f"migration {migration.name} was applied with checksum {recorded[:12]}… but the file now has "
                f"{migration.checksum[:12]}…: applied migrations must not be edited, add a new file instead"
            )
    applied: list[str] = []
    for migration in migrations:
        if migration.name in done:
            continue
        statements = migration.statements
        if cluster is not None:
            statements = [node for s in statements for node in cluster_statements(s, sharded, cluster)]
        logger.info("applying ClickHouse migration %s (%d statements)", migration.name, len(statements))
        for number, statement in enumerate(statements, 1):
            try:
                client.command(statement, settings=_SYNC)
            except Exception as ex:
                raise MigrationError(
                    f"migration {migration.name}, statement {number}/{len(statements)} failed: {ex}\n"
                    f"{_first_lines(statement)}"
                ) from ex
        client.insert(
            MIGRATIONS_TABLE,
            [[migration.name, migration.checksum, datetime.now(UTC)]],
            column_names=["name", "checksum", "applied_at"],
            settings=_SYNC,
        )
        applied.append(migration.name)
    return applied


def apply_to_shards(clients: list[Any], cluster: ClusterLayout | None = None) -> list[str]:
    """Apply the migrations on one server, or on a cluster: on every node one by one, or, when it
    is replicated, once (ON CLUSTER). Returns the names applied now, anywhere."""
    if cluster is None or cluster.replicated:
        return apply_migrations(clients[0], cluster=cluster)
    applied: dict[str, None] = {}
    for client in clients:
        applied.update(dict.fromkeys(apply_migrations(client, cluster=cluster)))
    return list(applied)


def _first_lines(statement: str, count: int = 6) -> str:
    lines = statement.splitlines()
    text = "\n".join(lines[:count])
    return text + ("\n…" if len(lines) > count else "")


def applied_offsets(client: Any, table: str, topic: str) -> dict[int, int]:
    """partition -> highest Kafka offset of ``topic`` already applied to ``table``.

    The consumer skips messages at or below it. Read from the rows themselves, so it can never
    disagree with the data. For the fact tables the query is answered by the aggregate projection
    ``offset_digests`` (005_offset_audit.sql; a few rows per part); the dimension tables are small
    and scanned.
    Partitions with nothing applied are absent.
    """
    rows = client.query(
        f"SELECT _partition, max(_offset) FROM {quote(table, 'table')} WHERE _topic = {{topic:String}} GROUP BY _partition",
        parameters={"topic": topic},
    ).result_rows
    return {int(partition): int(offset) for partition, offset in rows}
