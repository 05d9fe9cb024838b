"""Applies ``sql/migrations/NNNN_name.sql`` in order, once each, under an advisory lock.

Forward-only, like graphile-worker's migrations: a migration that has landed is never edited;
changes come as a new file. Every applied version is recorded in
``listener.schema_migrations``. Running ``migrate`` again applies nothing; running it from
several processes at once is safe because they serialize on the advisory lock; a database
migrated by a newer listener is refused rather than silently used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from loguru import logger

from listener.db.sqlfiles import sql_dir

# pg_advisory_xact_lock key: the bytes of "lstnmigr".
MIGRATION_LOCK_KEY = int.from_bytes(b"lstnmigr", "big") & 0x7FFF_FFFF_FFFF_FFFF

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


class MigrationError(RuntimeError):
    """The database cannot be migrated by this version of listener."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: version number, short name and SQL text."""

    version: int
    name: str
    sql: str


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Read the migration files of ``directory`` (default ``sql/migrations``), in version order.

    Raises:
        MigrationError: two files share a version number.
    """
    directory = directory or sql_dir() / "migrations"
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations have version {version:04d}")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def applied_versions(conn: asyncpg.Connection) -> list[int]:
    """Versions recorded in ``listener.schema_migrations``; empty on a fresh database."""
    exists = await conn.fetchval("SELECT to_regclass('listener.schema_migrations') IS NOT NULL")
    if not exists:
        return []
    rows = await conn.fetch("SELECT version FROM listener.schema_migrations ORDER BY version")
    return [int(r["version"]) for r in rows]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration the database lacks, in one transaction.

    Returns:
        The applied migrations as ``"NNNN_name"``; empty when the schema was current.

    Raises:
        MigrationError: the database has a migration this listener does not know (it was
            migrated by a newer version).
        asyncpg.PostgresError: a migration failed; nothing of this run is kept.
    """
    migrations = load_migrations()
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS listener;
            CREATE TABLE IF NOT EXISTS listener.schema_migrations (
                version    integer     PRIMARY KEY,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """
        )
        done = set(await applied_versions(conn))
        known = {m.version for m in migrations}
        unknown = sorted(done - known)
        if unknown:
            raise MigrationError(
                f"the database has migration {unknown[-1]:04d}, newer than this listener "
                f"knows (up to {max(known, default=0):04d}): upgrade listener"
            )
        for migration in migrations:
            if migration.version in done:
                continue
            label = f"{migration.version:04d}_{migration.name}"
            logger.info("applying migration {}", label)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO listener.schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(label)
    return applied
