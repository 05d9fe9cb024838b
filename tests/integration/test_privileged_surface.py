"""The privileged surface of a migrated database equals the list checked in beside the SQL.

``sql/privileged_surface.txt`` lists every function of the ``listener`` schema (those attach
generates per table with ``<oid>`` for the table's oid) with its owner, whether it is
SECURITY DEFINER, its SET clauses and who may EXECUTE it, plus who owns the schema and who
may use it. A new function, a widened grant, a definer without its search_path: each changes
this list, so it cannot happen without a reviewed change of the file.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from support import admit
from test_attacks import as_role

from listener.db.migrate import MigrationError, applied_versions, migrate

SURFACE_FILE = Path(__file__).resolve().parents[2] / "sql" / "privileged_surface.txt"


async def surface(conn: asyncpg.Connection) -> list[str]:
    """One line per function of schema ``listener``, then the schema's owner and grants:
    ``signature | owner | definer|invoker | config | may execute``, sorted."""
    rows = await conn.fetch(
        """
        SELECT p.oid::regprocedure::text AS signature,
               pg_get_userbyid(p.proowner) AS owner,
               CASE WHEN p.prosecdef THEN 'definer' ELSE 'invoker' END AS security,
               coalesce(nullif(array_to_string(
                   ARRAY(SELECT c FROM unnest(p.proconfig) AS c ORDER BY c), '; '), ''), '-')
                   AS config,
               coalesce((SELECT string_agg(
                             CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                  ELSE pg_get_userbyid(a.grantee) END, ', '
                             ORDER BY 1)
                         FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner)))
                              AS a
                         WHERE a.privilege_type = 'EXECUTE'), '-') AS execute
        FROM pg_proc AS p
        WHERE p.pronamespace = 'listener'::regnamespace
        """
    )
    lines = [
        re.sub(r"_\d+\(", "_<oid>(", r["signature"])
        + f" | {r['owner']} | {r['security']} | {r['config']} | {r['execute']}"
        for r in rows
    ]
    schema = await conn.fetchrow(
        """
        SELECT pg_get_userbyid(n.nspowner) AS owner,
               (SELECT string_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                ELSE pg_get_userbyid(a.grantee) END, ', ')
                FROM aclexplode(n.nspacl) AS a WHERE a.privilege_type = 'USAGE') AS usage
        FROM pg_namespace AS n WHERE n.nspname = 'listener'
        """
    )
    lines.append(f"schema listener | {schema['owner']} | usage: {schema['usage']}")
    return sorted(lines)


async def test_the_privileged_surface_is_the_checked_in_list(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "CREATE TABLE public.images (id bigint PRIMARY KEY, url text, owner_id text, "
        "status text, result jsonb, error text, analyzed_at timestamptz)"
    )
    await conn.execute(
        "SELECT listener.attach('public.images', 'id', 'url', 'owner_id', 'status', 'result', "
        "'error', 'analyzed_at')"
    )
    found = await surface(conn)
    listed = [
        line
        for line in SURFACE_FILE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert found == listed, (
        f"the privileged surface changed; if that is intended, {SURFACE_FILE.name} becomes:\n"
        + "\n".join(found)
    )


async def test_every_definer_function_pins_its_search_path(conn: asyncpg.Connection) -> None:
    """The rule of PostgreSQL's "Writing SECURITY DEFINER Functions Safely": a fixed
    search_path with pg_temp last, EXECUTE not granted to PUBLIC, and not owned by a
    superuser."""
    await conn.execute("CREATE TABLE public.images (id bigint PRIMARY KEY, url text)")
    await conn.execute("SELECT listener.attach('public.images', 'id', 'url')")
    rows = await conn.fetch(
        """
        SELECT p.oid::regprocedure::text AS fn, p.proconfig, r.rolsuper,
               has_function_privilege('public', p.oid, 'EXECUTE') AS public_may
        FROM pg_proc AS p JOIN pg_roles AS r ON r.oid = p.proowner
        WHERE p.pronamespace = 'listener'::regnamespace AND p.prosecdef
        """
    )
    assert len(rows) > 20
    for r in rows:
        assert "search_path=pg_catalog, pg_temp" in (r["proconfig"] or []), r["fn"]
        assert not r["rolsuper"], r["fn"]
        assert not r["public_may"], r["fn"]


async def test_migrate_refuses_a_role_that_cannot_create_the_roles(
    pg_admin_dsn: str, dsn_for: Callable[[str], str]
) -> None:
    """A role without CREATEROLE, not a member of listener_owner, gets the SQL to run."""
    name = f"norole_{secrets.token_hex(4)}"
    role = f"migrator_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f'CREATE DATABASE "{name}" OWNER {role}')
        conn = await asyncpg.connect(as_role(dsn_for(name), role))
        try:
            with pytest.raises(MigrationError, match="CREATE ROLE listener_owner NOLOGIN"):
                await migrate(conn)
            assert await applied_versions(conn) == []
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_migrate_refuses_a_superuser_owner_unless_told(
    pg_admin_dsn: str, dsn_for: Callable[[str], str]
) -> None:
    name = f"superowner_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.execute("ALTER ROLE listener_owner SUPERUSER")
    try:
        conn = await asyncpg.connect(dsn_for(name))
        try:
            with pytest.raises(MigrationError, match="listener_owner is a superuser"):
                await migrate(conn)
            assert await applied_versions(conn) == []
            assert await migrate(conn, allow_superuser_owner=True)
        finally:
            await conn.close()
    finally:
        await admin.execute("ALTER ROLE listener_owner NOSUPERUSER")
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrate_hands_tables_attached_before_0020_to_listener_owner(
    database_before: Callable[[int], Awaitable[str]],
) -> None:
    conn = await asyncpg.connect(await database_before(20))
    try:
        await conn.execute(
            "CREATE DOMAIN public.image_id AS bigint; "
            "CREATE TABLE public.photos (id public.image_id PRIMARY KEY, url text); "
            "SELECT listener.attach('public.photos', 'id', 'url')"
        )
        await conn.execute("INSERT INTO public.photos VALUES (1, 'u1')")
        assert (await migrate(conn))[0] == "0020_least_privilege"
        row = await conn.fetchrow(
            "SELECT pg_get_userbyid(proowner) AS owner, proconfig FROM pg_proc "
            "WHERE proname = 'enqueue_insert_' || 'public.photos'::regclass::oid"
        )
        assert (row["owner"], row["proconfig"]) == (
            "listener_owner",
            ["search_path=pg_catalog, pg_temp"],
        )
        assert await conn.fetchval("SELECT id_type FROM listener.attachments") == "public.image_id"
        await conn.execute("INSERT INTO public.photos VALUES (2, 'u2')")
        assert await admit(conn) == 2
        assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 2
        # Nothing in the schema is left to the role that migrated.
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_class WHERE relnamespace = 'listener'::regnamespace "
                "AND relkind IN ('r', 'S') AND pg_get_userbyid(relowner) <> 'listener_owner'"
            )
            == 0
        )
    finally:
        await conn.close()
