"""``sql/schema.sql`` (a new install) and the migrations (an upgrade) make the same schema.

Each case builds a database of its own and reads back the ``listener`` schema from the
catalog: tables and columns (type, default, not-null, collation, identity), sequences,
indexes, constraints, every function as ``pg_get_functiondef`` prints it (its body, SET
clauses and security), triggers, row-level security policies, owners, ACLs (as sets of
grants; no ACL reads as the owner's default one), comments, and the rows migrations seed.
The oid of an attached table, part of its generated functions' names and bodies, is written
``<oid>``. Any difference fails the test with a diff of the two readings.
"""

from __future__ import annotations

import difflib
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from listener.db.migrate import load_migrations, load_schema, migrate

# The app's table the upgrade cases attach, and the reference attaches on the new install.
APP_TABLE = (
    "CREATE TABLE public.images (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "url text, owner_id text, status text)"
)
ATTACH = "SELECT listener.attach('public.images', 'id', 'url', 'owner_id', 'status')"

# (kind, query): each row's columns are joined with " | ", one line per row.
_CATALOG: list[tuple[str, str]] = [
    (
        "schema",
        """
        SELECT n.nspname, pg_get_userbyid(n.nspowner),
               (SELECT string_agg(a::text, ' ' ORDER BY a::text)
                FROM unnest(coalesce(n.nspacl, acldefault('n', n.nspowner))) AS a)
        FROM pg_namespace AS n WHERE n.nspname = 'listener'
        """,
    ),
    (
        "relation",
        """
        SELECT c.oid::regclass::text, c.relkind::text, c.relpersistence::text, c.relrowsecurity,
               pg_get_userbyid(c.relowner),
               (SELECT string_agg(a::text, ' ' ORDER BY a::text)
                FROM unnest(coalesce(
                    c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char",
                                         c.relowner))) AS a)
        FROM pg_class AS c
        WHERE c.relnamespace = 'listener'::regnamespace OR c.oid = $1::regclass
        """,
    ),
    (
        "column",
        """
        SELECT c.oid::regclass::text,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum), a.attname,
               format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text,
               (SELECT l.collname FROM pg_collation AS l
                WHERE l.oid = a.attcollation AND a.attcollation <> 100),
               (SELECT string_agg(x::text, ' ' ORDER BY x::text) FROM unnest(a.attacl) AS x)
        FROM pg_class AS c
        JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef AS d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE c.relkind IN ('r', 'p', 'v', 'm')
          AND (c.relnamespace = 'listener'::regnamespace OR c.oid = $1::regclass)
        """,
    ),
    (
        "sequence",
        """
        SELECT s.seqrelid::regclass::text, format_type(s.seqtypid, NULL), s.seqstart,
               s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle,
               (SELECT d.refobjid::regclass::text || '.' || a.attname || ' ' || d.deptype::text
                FROM pg_depend AS d
                JOIN pg_attribute AS a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))
        FROM pg_sequence AS s
        JOIN pg_class AS c ON c.oid = s.seqrelid
        WHERE c.relnamespace = 'listener'::regnamespace
        """,
    ),
    (
        "index",
        """
        SELECT pg_get_indexdef(i.indexrelid)
        FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indrelid
        WHERE c.relnamespace = 'listener'::regnamespace OR c.oid = $1::regclass
        """,
    ),
    (
        "constraint",
        """
        SELECT k.conrelid::regclass::text, k.conname, k.contype::text, pg_get_constraintdef(k.oid),
               k.condeferrable, k.condeferred
        FROM pg_constraint AS k
        WHERE k.connamespace = 'listener'::regnamespace OR k.conrelid = $1::regclass
        """,
    ),
    (
        "function",
        """
        SELECT p.oid::regprocedure::text, pg_get_userbyid(p.proowner),
               (SELECT string_agg(a::text, ' ' ORDER BY a::text)
                FROM unnest(coalesce(p.proacl, acldefault('f', p.proowner))) AS a),
               pg_get_functiondef(p.oid)
        FROM pg_proc AS p WHERE p.pronamespace = 'listener'::regnamespace
        """,
    ),
    (
        "trigger",
        """
        SELECT t.tgrelid::regclass::text, t.tgname, t.tgenabled::text, pg_get_triggerdef(t.oid)
        FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
        WHERE NOT t.tgisinternal
          AND (c.relnamespace = 'listener'::regnamespace OR c.oid = $1::regclass)
        """,
    ),
    (
        "policy",
        """
        SELECT p.schemaname, p.tablename, p.policyname, p.permissive, p.roles::text, p.cmd,
               p.qual, p.with_check
        FROM pg_policies AS p
        WHERE p.schemaname = 'listener' OR (p.schemaname, p.tablename) = ('public', 'images')
        """,
    ),
    (
        "comment",
        """
        SELECT pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description
        FROM pg_description AS d
        WHERE (d.classoid = 'pg_class'::regclass AND d.objoid IN (
                  SELECT c.oid FROM pg_class AS c
                  WHERE c.relnamespace = 'listener'::regnamespace))
           OR (d.classoid = 'pg_proc'::regclass AND d.objoid IN (
                  SELECT p.oid FROM pg_proc AS p
                  WHERE p.pronamespace = 'listener'::regnamespace))
           OR (d.classoid = 'pg_namespace'::regclass
               AND d.objoid = 'listener'::regnamespace)
           OR (d.classoid = 'pg_trigger'::regclass AND d.objoid IN (
                  SELECT t.oid FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
                  WHERE c.relnamespace = 'listener'::regnamespace))
        """,
    ),
    # Rows the schema seeds (and, for the upgrade cases, the attachment), without clocks.
    ("migration", "SELECT version, name FROM listener.schema_migrations"),
    ("lock", "SELECT name FROM listener.locks"),
    ("event_settings", "SELECT singleton, webhooks, notify_row_ids FROM listener.event_settings"),
    ("reanalyze_limits", "SELECT singleton, per_owner_per_day FROM listener.reanalyze_limits"),
    (
        "attachment",
        """
        SELECT source_table, id_column, id_type, url_column, owner_column, status_column,
               result_column, error_column, analyzed_at_column,
               table_oid = to_regclass('public.images')
        FROM listener.attachments
        """,
    ),
]


async def read_schema(conn: asyncpg.Connection) -> list[str]:
    """The ``listener`` schema (and the attached ``public.images``, if any), one line per
    object, sorted, with attached tables' oids written ``<oid>``. Each line of a multi-line
    value (a function's definition) is prefixed with its object's kind and name, so a diff
    names the object."""
    table = await conn.fetchval("SELECT to_regclass('public.images')::text")
    oids = [r["table_oid"] for r in await conn.fetch("SELECT table_oid FROM listener.attachments")]
    records: list[str] = []
    for kind, query in _CATALOG:
        args = [table] if "$1" in query else []
        for row in await conn.fetch(query, *args):
            values = ["NULL" if v is None else str(v) for v in row]
            record = f"{kind}: " + " | ".join(values)
            for oid in oids:
                record = re.sub(rf"(?<![0-9]){oid}(?![0-9])", "<oid>", record)
            records.append(record)
    lines: list[str] = []
    for record in sorted(records):
        first, *rest = record.split("\n")
        name = first.split(" | ", 1)[0]
        lines.append(first)
        lines.extend(f"{name}   {line}" for line in rest)
    return lines


def assert_same(expected: list[str], actual: list[str], expected_by: str, actual_by: str) -> None:
    """Fail with a unified diff when two readings differ."""
    if expected != actual:
        diff = "\n".join(
            difflib.unified_diff(expected, actual, expected_by, actual_by, lineterm="", n=1)
        )
        pytest.fail(f"the schema made by {actual_by} differs from {expected_by}'s:\n{diff}")


@pytest.fixture
async def new_database(
    pg_admin_dsn: str, dsn_for: Callable[[str], str]
) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """``await new_database()``: the DSN of a new empty database, dropped after the test."""
    created: list[str] = []

    async def make() -> str:
        name = f"schema_{secrets.token_hex(6)}"
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        created.append(name)
        return dsn_for(name)

    try:
        yield make
    finally:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            for name in created:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def replay_migrations(dsn: str) -> None:
    """Every migration in order on an empty database, recorded as ``listener migrate`` of
    each release did, then ``listener migrate`` (its privileges and reattach)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE SCHEMA listener; CREATE TABLE listener.schema_migrations ("
            "version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        migrations = load_migrations()
        async with conn.transaction():
            for m in migrations[:-1]:
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO listener.schema_migrations (version, name) VALUES ($1, $2)",
                    m.version,
                    m.name,
                )
        # The last one through migrate, which ends every run with apply_privileges.
        assert await migrate(conn) == [f"{migrations[-1].version:04d}_{migrations[-1].name}"]
    finally:
        await conn.close()


async def install(dsn: str, *, attach: bool = False) -> list[str]:
    """``listener migrate`` on an empty database (schema.sql), then optionally the app's
    table attached; the schema read back."""
    conn = await asyncpg.connect(dsn)
    try:
        assert await migrate(conn) == [f"{m.version:04d}_{m.name}" for m in load_migrations()]
        if attach:
            await conn.execute(APP_TABLE)
            await conn.execute(ATTACH)
        return await read_schema(conn)
    finally:
        await conn.close()


async def test_schema_sql_is_the_migrated_schema(
    new_database: Callable[[], Awaitable[str]],
) -> None:
    migrated = await new_database()
    await replay_migrations(migrated)
    conn = await asyncpg.connect(migrated)
    try:
        expected = await read_schema(conn)
    finally:
        await conn.close()
    installed = await install(await new_database())
    assert any(line.startswith("function: listener.claim_jobs(") for line in installed)
    assert_same(expected, installed, "the migrations", "schema.sql")


@pytest.mark.parametrize("before", [11, 20])
async def test_an_upgrade_with_an_attached_table_reaches_the_schema_of_a_new_install(
    new_database: Callable[[], Awaitable[str]],
    database_before: Callable[[int], Awaitable[str]],
    before: int,
) -> None:
    """A database of an earlier release (migrations before ``before``), with a table attached
    then, migrated to the latest: the same schema, the same generated functions, triggers,
    grants and policy on the table, as a new install that attached the same table."""
    old = await database_before(before)
    conn = await asyncpg.connect(old)
    try:
        await conn.execute(APP_TABLE)
        await conn.execute(ATTACH)
        await conn.execute("INSERT INTO public.images (url) VALUES ('http://a/1')")
        await migrate(conn)
        upgraded = await read_schema(conn)
    finally:
        await conn.close()
    assert any(line.startswith("trigger: images | listener_enqueue_insert") for line in upgraded)
    installed = await install(await new_database(), attach=True)
    assert_same(installed, upgraded, "schema.sql", f"an upgrade from {before - 1:04d}")


async def test_schema_sql_names_no_migration_leftover() -> None:
    """No wrapper of an older function and no setting nothing sets any more."""
    schema = load_schema()
    for leftover in ("_0014", "_0017", "attach_triggers", "attach_deletes", "enqueue_counts"):
        assert leftover not in schema
    # The claim the query-plan test EXPLAINs is in the file, between its markers.
    assert schema.count("-- claim: begin") == 1 and schema.count("-- claim: end") == 1
