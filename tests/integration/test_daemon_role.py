"""The daemon runs as a login role of its own in ``listener_worker``, as "Security in the
database" (docs/explanations/security.md) sets it up, against a table with row-level security
owned by a role of the app's: rows are admitted, analyzed, written back and forgotten when
deleted, and the app's own triggers never run as a superuser or as listener's owner."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
from awaiting import loop_signals, when, when_written
from support import RecordingProvider, fast_settings
from test_attacks import as_role, docs_sql

from listener.app import Daemon, warn_if_privileged


@pytest.fixture
async def daemon_role(conn: asyncpg.Connection) -> AsyncIterator[str]:
    """The documented ``listener_daemon``, under a name of this test's."""
    role = f"listener_daemon_{secrets.token_hex(4)}"
    await conn.execute(
        docs_sql("explanations/security.md", "CREATE ROLE listener_daemon LOGIN").replace(
            "listener_daemon", role
        )
    )
    try:
        yield role
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_the_daemon_as_its_own_role_analyzes_writes_back_and_forgets_rows(
    database_url: str, conn: asyncpg.Connection, daemon_role: str
) -> None:
    owner = f"app_owner_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE ROLE {owner} NOLOGIN; GRANT CREATE ON SCHEMA public TO {owner}")
    try:
        await conn.execute(f"SET ROLE {owner}")
        await conn.execute(
            """
            CREATE TABLE public.photos (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                url text NOT NULL, owner_id text, status text, result jsonb, error text,
                analyzed_at timestamptz, updated_by text[] NOT NULL DEFAULT '{}');
            -- Row-level security with no policy for listener's roles: the app's own.
            ALTER TABLE public.photos ENABLE ROW LEVEL SECURITY;
            -- The owner's trigger records who runs each update of a row.
            CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                NEW.updated_by := NEW.updated_by || (
                    current_user || CASE WHEN (SELECT rolsuper FROM pg_roles
                                               WHERE rolname = current_user)
                                         THEN ' (superuser)' ELSE '' END);
                RETURN NEW;
            END $$;
            CREATE TRIGGER stamp BEFORE UPDATE ON public.photos
                FOR EACH ROW EXECUTE FUNCTION public.stamp();
            INSERT INTO public.photos (url, owner_id)
            SELECT 'http://img/' || g, 'o' || (g % 2) FROM generate_series(1, 3) g;
            """
        )
        await conn.execute("RESET ROLE")
        await conn.execute(
            "SELECT listener.attach('public.photos', 'id', 'url', 'owner_id', 'status', "
            "'result', 'error', 'analyzed_at')"
        )
        # Rows inserted before attaching are backfilled; these three go through the trigger.
        await conn.execute(
            "INSERT INTO public.photos (url, owner_id) "
            "SELECT 'http://img/new' || g, 'o1' FROM generate_series(1, 3) g"
        )
        dsn = as_role(database_url, daemon_role)
        role_conn = await asyncpg.connect(dsn)
        try:
            assert not await warn_if_privileged(role_conn)
        finally:
            await role_conn.close()
        assert await warn_if_privileged(conn)  # the test's superuser

        provider = RecordingProvider()
        async with Daemon(fast_settings(dsn), providers=[provider], health=False) as daemon:
            await daemon.signals.wait("finished", 3)

            async def written() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) = 3 FROM public.photos "
                        "WHERE status = 'complete' AND result ? 'recording.step' "
                        "AND analyzed_at IS NOT NULL"
                    )
                )

            await when_written(daemon, written, 15)
            await conn.execute("DELETE FROM public.photos WHERE url = 'http://img/new1'")

            async def forgotten() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) = 2 FROM listener.jobs "
                        "WHERE source_table = 'public.photos'"
                    )
                    and not await conn.fetchval("SELECT count(*) FROM listener.deleted_rows")
                )

            await when(forgotten, loop_signals(daemon, "deletes"), "ticked", 15)
        assert sorted(provider.calls) == ["4", "5", "6"]
        stamps = {
            s
            for r in await conn.fetch("SELECT updated_by FROM public.photos")
            for s in r["updated_by"]
        }
        assert stamps == {daemon_role}
    finally:
        await conn.execute("RESET ROLE")
        await conn.execute(f"DROP OWNED BY {owner}; DROP ROLE {owner}")
