"""Re-analysis on request: the app calls ``listener.reanalyze`` through its own role, the
operator runs ``listener reanalyze``; complete rows run again from scratch."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from support import RecordingProvider, admit, cli, counts, fast_settings, make_table

from listener.app import Daemon


def as_role(dsn: str, role: str) -> str:
    """``dsn`` logged in as ``role`` (the test cluster trusts local connections)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


async def test_an_app_role_reanalyzes_complete_rows_and_rows_never_queued(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn, attach=False)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('old')")  # before attaching
    await conn.execute("SELECT listener.attach($1, 'id', 'url')", table)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b'), ('c')")
    role = f"app_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        provider = RecordingProvider()
        async with Daemon(fast_settings(database_url), providers=[provider], health=False) as d:
            await d.signals.wait("finished", 3)
            app = await asyncpg.connect(as_role(database_url, role))
            try:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await app.fetchval("SELECT listener.reanalyze($1, ARRAY['2'], 0)", table)
                await conn.execute(
                    f"GRANT USAGE ON SCHEMA listener TO {role}; GRANT EXECUTE ON FUNCTION "
                    f"listener.reanalyze(regclass, text[], integer) TO {role}"
                )
                # Row 2 (complete) again, and row 1, which was inserted before attaching.
                assert (
                    await app.fetchval("SELECT listener.reanalyze($1, ARRAY['1', '2'], 0)", table)
                    == 2
                )
            finally:
                await app.close()
            await d.signals.wait("finished", 5)
        assert sorted(provider.calls) == ["1", "2", "2", "3", "4"]
        assert await counts(conn) == {"complete": 4}
        results = await conn.fetchval("SELECT count(*) FROM listener.results")
        assert results == 4  # one per row: the old result of row 2 was replaced, not kept
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_cli_reanalyze_by_id_owner_where_and_all(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    table = await make_table(conn, owner=True)
    await conn.execute(
        f"INSERT INTO {table} (url, owner_id) VALUES ('a', 'alice'), ('b', 'alice'), "
        "('c', 'bob'), ('d', 'bob')"
    )
    assert await admit(conn) == 4
    await conn.execute("UPDATE listener.jobs SET status = 'complete'")

    def reanalyze(*args: str) -> dict[str, object]:
        out = cli(env_for_subprocess, "reanalyze", table, *args, "--json", ok=True)
        result: dict[str, object] = json.loads(out.stdout)
        return result

    assert reanalyze("--id", "1", "--dry-run") == {"rows": 1, "reanalyzed": 0, "dry_run": True}
    assert await counts(conn) == {"complete": 4}
    assert reanalyze("--id", "1")["reanalyzed"] == 1
    assert reanalyze("--owner", "bob")["reanalyzed"] == 2
    assert reanalyze("--where", "url = 'b'")["reanalyzed"] == 1
    assert await counts(conn) == {"pending": 4}
    await conn.execute("UPDATE listener.jobs SET status = 'complete'")
    assert reanalyze("--all")["reanalyzed"] == 4
    await conn.execute("UPDATE listener.jobs SET status = 'complete'")
    # The predicate runs read-only: it cannot write, whatever it contains.
    bad = cli(
        env_for_subprocess,
        "reanalyze",
        table,
        "--where",
        f"listener.reanalyze('{table}', ARRAY['1'], 0) > 0",
    )
    assert bad.returncode != 0 and "read-only" in bad.stderr
    assert await counts(conn) == {"complete": 4}


def _supabase_sql(starts_with: str) -> str:
    """The Supabase guide's SQL block that contains ``starts_with`` (what users copy)."""
    page = Path(__file__).resolve().parents[2] / "docs" / "guides" / "supabase.md"
    for block in re.findall(r"```sql\n(.*?)```", page.read_text(), flags=re.S):
        if starts_with in block:
            return str(block)
    raise AssertionError(f"no SQL block with {starts_with!r} in docs/guides/supabase.md")


async def test_the_documented_supabase_retag_rpc_reanalyzes_only_the_callers_rows(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The documented ``retag_images`` RPC, as Supabase runs it: ``auth.uid()`` from the JWT."""
    suffix = secrets.token_hex(4)
    authenticated = f"authenticated_{suffix}"
    await conn.execute(
        f"""
        CREATE SCHEMA IF NOT EXISTS auth;
        -- Supabase's auth.uid(): the JWT's subject, set per request by PostgREST.
        CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
            $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;
        CREATE ROLE {authenticated} LOGIN;
        GRANT USAGE ON SCHEMA auth TO {authenticated};
        CREATE TABLE public.vehicle_images (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id uuid NOT NULL,
            image_url text NOT NULL,
            processing_status text
        );
        """
    )
    await conn.execute(
        "SELECT listener.attach('public.vehicle_images', 'id', 'image_url', 'user_id', "
        "'processing_status')"
    )
    sql = _supabase_sql("CREATE FUNCTION public.retag_images").replace(
        "TO authenticated", f"TO {authenticated}"
    )
    await conn.execute(sql)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    ids = await conn.fetch(
        "INSERT INTO public.vehicle_images (user_id, image_url) "
        "VALUES ($1, 'a'), ($1, 'b'), ($2, 'c') RETURNING id",
        alice,
        bob,
    )
    assert await admit(conn) == 3
    # Analyzed once: complete, results stored.
    await conn.execute(
        "UPDATE listener.jobs SET status = 'complete', finished_at = now() "
        "WHERE source_table = 'public.vehicle_images'"
    )
    app = await asyncpg.connect(as_role(database_url, authenticated))
    try:
        async with app.transaction():
            await app.execute(f"SET LOCAL request.jwt.claim.sub = '{alice}'")
            # Alice asks for all three; only her two are hers.
            n = await app.fetchval("SELECT public.retag_images($1::uuid[])", [r["id"] for r in ids])
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.fetchval("SELECT listener.reanalyze('public.vehicle_images', '{}', 0)")
    finally:
        await app.close()
    assert n == 2
    statuses = {
        r["owner_id"]: r["statuses"]
        for r in await conn.fetch(
            "SELECT owner_id, array_agg(status ORDER BY status) AS statuses FROM listener.jobs "
            "WHERE source_table = 'public.vehicle_images' GROUP BY owner_id"
        )
    }
    assert statuses == {str(alice): ["pending", "pending"], str(bob): ["complete"]}
