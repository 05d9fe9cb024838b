"""listener's SQL beside hostile tenants: each attack a tenant could try, as a test.

The setup is the documented one for Supabase (docs/guides/supabase.md, "A Supabase table,
every column"): the app's table
``public.vehicle_images`` belongs to a role of the app (not a superuser) and has row-level
security, one policy per tenant (``user_id = auth.uid()``); the signed-in user is the role
``authenticated`` (here with a random suffix: roles are shared by the whole test cluster);
the app's RPCs are the documented wrappers, created by the table's owner. As a worst case the
tenant also has USAGE on schema ``listener`` (what older instructions advised). Every attack runs
as that tenant, on a real PostgreSQL:

1. a ``pg_temp`` type named ``text`` (with casts to it) while inserting, updating and deleting
   rows and calling every RPC: nothing runs as listener's owner, the tenant stays a tenant;
2. listener's trigger functions bound to a table of the tenant's: refused, and a trigger
   function bound elsewhere by someone who may refuses to run;
3. an id column of a type outside ``pg_catalog`` (a domain): attach stores it qualified, so a
   ``pg_temp`` domain of the same name is never used, and the rows are admitted;
4. (tests/integration/test_daemon_role.py) the write-back and admission run as listener's
   roles, not a superuser;
5. advisory locks on listener's former keys, and every lock a tenant can try on listener's
   tables: admission, the deleted rows' claim, the rollups and the faces lock go on;
6. ``LISTEN listener_events``: no row ids;
plus functions and operators shadowed through a schema the tenant owns placed first on its
search_path, direct calls of every listener function, other tenants' rows reached through
every RPC, and the per-owner re-analysis quota. ``verify_signature`` (7) is tested in
tests/unit/test_webhook_signature.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from support import admit

DOCS = Path(__file__).resolve().parents[2] / "docs"
TABLE = "public.vehicle_images"


def docs_sql(page: str, starts_with: str) -> str:
    """The SQL block of the docs page ``page`` (relative to docs/) whose text contains
    ``starts_with`` (what users copy)."""
    for block in re.findall(r"```sql\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S):
        if starts_with in block:
            return str(block)
    raise AssertionError(f"no SQL block with {starts_with!r} in docs/{page}")


def as_role(dsn: str, role: str) -> str:
    """``dsn`` logged in as ``role`` (the test cluster trusts local connections)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


@dataclass
class App:
    """The documented Supabase setup in this test's database."""

    dsn: str
    admin: asyncpg.Connection
    tenant: str  # the role every signed-in user is (Supabase's `authenticated`)
    owner: str  # the role that owns the app's table and RPCs
    alice: uuid.UUID
    bob: uuid.UUID

    async def connect(self, user: uuid.UUID | None) -> asyncpg.Connection:
        """A session of the tenant role signed in as ``user`` (None: no JWT)."""
        conn = await asyncpg.connect(as_role(self.dsn, self.tenant))
        if user is not None:
            await conn.execute(f"SET request.jwt.claim.sub = '{user}'")
        return conn

    async def breaches(self) -> list[tuple[str, bool]]:
        """``(current_user, superuser)`` of every run of the tenant's planted code as a role
        other than the tenant."""
        rows = await self.admin.fetch(
            "SELECT DISTINCT who, superuser FROM public.pwned WHERE who <> $1", self.tenant
        )
        return [(r["who"], r["superuser"]) for r in rows]

    async def tenant_is_superuser(self) -> bool:
        return bool(
            await self.admin.fetchval(
                "SELECT rolsuper FROM pg_roles WHERE rolname = $1", self.tenant
            )
        )


@pytest.fixture
async def app(database_url: str, conn: asyncpg.Connection) -> AsyncIterator[App]:
    suffix = secrets.token_hex(4)
    tenant, owner = f"authenticated_{suffix}", f"app_owner_{suffix}"
    await conn.execute(
        f"""
        CREATE SCHEMA auth;
        -- Supabase's auth.uid(): the JWT's subject, set per request by PostgREST.
        CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
            $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;
        CREATE ROLE {tenant} LOGIN;
        CREATE ROLE {owner} NOLOGIN;
        GRANT USAGE ON SCHEMA auth TO {tenant}, {owner};
        GRANT CREATE ON SCHEMA public TO {owner};
        -- Where the tenant's planted code writes down who ran it.
        CREATE TABLE public.pwned (who text, superuser boolean);
        GRANT INSERT ON public.pwned TO PUBLIC;
        """
    )
    try:
        await conn.execute(f"SET ROLE {owner}")
        await conn.execute(
            f"""
            CREATE TABLE {TABLE} (
                id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                user_id uuid NOT NULL,
                image_url text NOT NULL,
                processing_status text,
                ai_scan_metadata jsonb,
                processing_error text,
                ai_last_scanned timestamptz
            );
            ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY;
            CREATE POLICY own_rows ON {TABLE} FOR ALL TO {tenant}
                USING (user_id = auth.uid()) WITH CHECK (user_id = auth.uid());
            GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {tenant};
            """
        )
        await conn.execute("RESET ROLE")
        await conn.execute(
            "SELECT listener.attach($1, 'id', 'image_url', 'user_id', 'processing_status', "
            "'ai_scan_metadata', 'processing_error', 'ai_last_scanned')",
            TABLE,
        )
        # The documented grants for an RPC owner that did not run `listener migrate`, then its
        # RPCs, created by that owner.
        await conn.execute(
            docs_sql(
                "reference/sql-functions.md", "GRANT USAGE ON SCHEMA listener TO app_owner"
            ).replace("app_owner", owner)
        )
        await conn.execute(f"SET ROLE {owner}")
        await conn.execute(
            docs_sql("guides/supabase.md", "CREATE FUNCTION public.retag_images").replace(
                "TO authenticated", f"TO {tenant}"
            )
        )
        await conn.execute("RESET ROLE")
        await conn.execute(f"GRANT USAGE ON SCHEMA listener TO {tenant}")  # the worst case
        yield App(database_url, conn, tenant, owner, uuid.uuid4(), uuid.uuid4())
    finally:
        await conn.execute("RESET ROLE")
        for role in (tenant, owner):
            await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {tenant}; DROP ROLE {owner}")


PLANT = """
CREATE FUNCTION pg_temp.pwn() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.pwned
    SELECT current_user, r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user;
    BEGIN
        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
END
$$;
"""


async def seed_faces(app: App) -> dict[str, str]:
    """One face, person and open suggestion per tenant (alice, bob), as the faces step leaves
    them. Returns the ids by name: ``alice_face``, ``alice_candidate``, ``bob_person``..."""
    ids: dict[str, str] = {}
    for name, user in (("alice", app.alice), ("bob", app.bob)):
        person = await app.admin.fetchval(
            "INSERT INTO listener.people (owner_id, collection_id) VALUES ($1, 'c') RETURNING id",
            str(user),
        )
        await app.admin.execute(
            "INSERT INTO listener.faces (face_id, collection_id, owner_id, source_table, "
            "source_id, person_id) VALUES ($1, 'c', $3, $4, 'x', $5), "
            "($2, 'c', $3, $4, 'y', NULL)",
            f"{name}-candidate",
            f"{name}-face",
            str(user),
            TABLE,
            person,
        )
        await app.admin.execute(
            "INSERT INTO listener.face_suggestions (face_id, candidate_face_id, person_id, "
            "similarity, owner_id) VALUES ($1, $2, $3, 90, $4)",
            f"{name}-face",
            f"{name}-candidate",
            person,
            str(user),
        )
        ids |= {
            f"{name}_face": f"{name}-face",
            f"{name}_candidate": f"{name}-candidate",
            f"{name}_person": str(person),
        }
    return ids


async def rows_of(app: App, user: uuid.UUID, n: int) -> list[uuid.UUID]:
    """``n`` rows of ``user``, inserted by the admin, admitted and complete."""
    ids = [
        r["id"]
        for r in await app.admin.fetch(
            f"INSERT INTO {TABLE} (user_id, image_url) "
            "SELECT $1, 'https://img.example/' || g FROM generate_series(1, $2) g RETURNING id",
            user,
            n,
        )
    ]
    await admit(app.admin)
    await app.admin.execute(
        "UPDATE listener.jobs SET status = 'complete', finished_at = now() "
        "WHERE source_id = ANY($1::text[])",
        [str(i) for i in ids],
    )
    return ids


async def every_rpc(app: App, tenant: asyncpg.Connection, faces: dict[str, str]) -> None:
    """Call each of the documented RPCs once, as the signed-in tenant (alice)."""
    # Ids as text: a session with a pg_temp type named text cannot introspect uuid[] (the
    # driver's own query casts to text), which is the attacker's problem, not listener's.
    mine = await tenant.fetchval(f"SELECT array_agg(id::pg_catalog.text) FROM {TABLE}")
    await tenant.fetchval("SELECT public.retag_images($1::pg_catalog.text[]::uuid[])", mine)
    await tenant.fetch("SELECT * FROM public.my_face_counts()")
    await tenant.fetch("SELECT * FROM public.my_face_people()")
    await tenant.fetch("SELECT * FROM public.my_face_suggestions()")
    await tenant.fetchval(
        "SELECT public.reject_face($1, $2)", faces["alice_face"], faces["alice_candidate"]
    )
    person = await tenant.fetchval(
        "SELECT public.accept_face($1, $2)", faces["alice_face"], faces["alice_candidate"]
    )
    await tenant.fetchval("SELECT public.rename_person($1, 'Ada')", person)
    await tenant.fetchval("SELECT public.merge_people($1, '{}')", person)


async def everything_a_tenant_does(
    app: App, tenant: asyncpg.Connection, faces: dict[str, str]
) -> uuid.UUID:
    """Insert a row, change its URL, call every RPC, delete the row (alice's own), each of
    which fires listener's triggers or functions. Returns the row's id."""
    row: uuid.UUID = await tenant.fetchval(
        f"INSERT INTO {TABLE} (user_id, image_url) VALUES ($1, 'https://img.example/a') "
        "RETURNING id",
        app.alice,
    )
    await tenant.execute(
        f"UPDATE {TABLE} SET image_url = 'https://img.example/b' WHERE id = $1", row
    )
    await every_rpc(app, tenant, faces)
    await tenant.execute(f"DELETE FROM {TABLE} WHERE id = $1", row)
    return row


async def test_a_pg_temp_type_named_text_runs_nothing_as_listener_or_a_superuser(
    app: App,
) -> None:
    """The attack as reported: a session's temporary schema is searched for type names first
    unless the path says otherwise, so an unqualified ``::text`` in a SECURITY DEFINER
    function without SET search_path used the tenant's type and cast, as the owner."""
    faces = await seed_faces(app)
    await rows_of(app, app.alice, 2)
    tenant = await app.connect(app.alice)
    try:
        await tenant.execute(PLANT)
        await tenant.execute(
            """
            CREATE TYPE pg_temp.text AS (v pg_catalog.text);
            CREATE TYPE pg_temp.jsonb AS (v pg_catalog.text);
            CREATE FUNCTION pg_temp.from_uuid(uuid) RETURNS pg_temp.text LANGUAGE plpgsql AS
                $$BEGIN PERFORM pg_temp.pwn(); RETURN ROW($1::pg_catalog.text); END$$;
            CREATE FUNCTION pg_temp.from_text(pg_catalog.text) RETURNS pg_temp.text
                LANGUAGE plpgsql AS
                $$BEGIN PERFORM pg_temp.pwn(); RETURN ROW($1); END$$;
            CREATE FUNCTION pg_temp.from_bigint(bigint) RETURNS pg_temp.text
                LANGUAGE plpgsql AS
                $$BEGIN PERFORM pg_temp.pwn(); RETURN ROW($1::pg_catalog.text); END$$;
            CREATE CAST (uuid AS pg_temp.text) WITH FUNCTION pg_temp.from_uuid(uuid);
            CREATE CAST (pg_catalog.text AS pg_temp.text)
                WITH FUNCTION pg_temp.from_text(pg_catalog.text);
            CREATE CAST (bigint AS pg_temp.text) WITH FUNCTION pg_temp.from_bigint(bigint);
            """
        )
        row = await everything_a_tenant_does(app, tenant, faces)
    finally:
        await tenant.close()
    assert await app.breaches() == []
    assert not await app.tenant_is_superuser()
    # And the app's writes did what they should: the insert was recorded, the delete too.
    assert (
        await app.admin.fetchval(
            "SELECT count(*) FROM listener.deleted_rows WHERE source_id = $1", str(row)
        )
        == 1
    )


async def test_a_schema_the_tenant_owns_first_on_its_search_path_shadows_nothing(
    app: App,
) -> None:
    """Functions and operators a tenant creates in its own schema, placed before pg_catalog,
    are never called by listener's functions or the documented RPCs."""
    faces = await seed_faces(app)
    await rows_of(app, app.alice, 1)
    await app.admin.execute(
        f"GRANT CREATE ON DATABASE {await app.admin.fetchval('SELECT current_database()')} "
        f"TO {app.tenant}"
    )
    tenant = await app.connect(app.alice)
    try:
        await tenant.execute("CREATE SCHEMA evil")
        await tenant.execute(
            """
            CREATE FUNCTION evil.pwn() RETURNS void LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO public.pwned SELECT current_user, r.rolsuper
                FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user;
            END $$;
            CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql AS
                $$BEGIN PERFORM evil.pwn(); RETURN pg_catalog.now(); END$$;
            CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS
                $$BEGIN PERFORM evil.pwn(); END$$;
            CREATE FUNCTION evil.count(anyelement) RETURNS bigint LANGUAGE plpgsql AS
                $$BEGIN PERFORM evil.pwn(); RETURN 0; END$$;
            CREATE FUNCTION evil.text_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS
                $$BEGIN PERFORM evil.pwn(); RETURN $1 OPERATOR(pg_catalog.=) $2; END$$;
            CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_eq);
            CREATE FUNCTION evil.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE plpgsql AS
                $$BEGIN PERFORM evil.pwn(); RETURN $1 OPERATOR(pg_catalog.=) $2; END$$;
            CREATE OPERATOR evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil.uuid_eq);
            CREATE FUNCTION evil.oid_ne(oid, oid) RETURNS boolean LANGUAGE plpgsql AS
                $$BEGIN PERFORM evil.pwn(); RETURN $1 OPERATOR(pg_catalog.<>) $2; END$$;
            CREATE OPERATOR evil.<> (LEFTARG = oid, RIGHTARG = oid, FUNCTION = evil.oid_ne);
            CREATE TABLE evil.inserted_rows (source_table text, source_id text);
            CREATE TABLE evil.jobs (id bigint);
            """
        )
        await tenant.execute("SET search_path = evil, pg_catalog, public")
        await everything_a_tenant_does(app, tenant, faces)
        assert await tenant.fetchval("SELECT count(*) FROM evil.inserted_rows") == 0
    finally:
        await tenant.close()
    assert await app.breaches() == []


async def test_listener_trigger_functions_cannot_be_bound_to_another_table(app: App) -> None:
    (row,) = await rows_of(app, app.alice, 1)
    triggers = [
        r["fn"]
        for r in await app.admin.fetch(
            "SELECT p.oid::regprocedure::text AS fn FROM pg_proc AS p "
            "WHERE p.pronamespace = 'listener'::regnamespace "
            "AND p.prorettype = 'trigger'::regtype ORDER BY 1"
        )
    ]
    assert len(triggers) >= 20
    tenant = await app.connect(app.alice)
    try:
        await tenant.execute("CREATE TEMP TABLE decoy (id uuid, user_id uuid, image_url text)")
        for fn in triggers:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await tenant.execute(
                    "CREATE TRIGGER t AFTER DELETE ON pg_temp.decoy REFERENCING OLD TABLE AS "
                    f"old_rows FOR EACH STATEMENT EXECUTE FUNCTION {fn}"
                )
    finally:
        await tenant.close()

    # Bound by someone who may (a superuser), a trigger function refuses to run anywhere but
    # on the table it was generated for: another tenant's row is not forgotten through it.
    oid = await app.admin.fetchval("SELECT $1::regclass::oid", TABLE)
    await app.admin.execute("CREATE TABLE public.decoy (id uuid)")
    await app.admin.execute(
        "CREATE TRIGGER t AFTER DELETE ON public.decoy REFERENCING OLD TABLE AS old_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION listener.forget_delete_{oid}()"
    )
    await app.admin.execute("INSERT INTO public.decoy VALUES ($1)", row)
    with pytest.raises(asyncpg.WrongObjectTypeError, match=r"fires on public\.vehicle_images"):
        await app.admin.execute("DELETE FROM public.decoy")
    await app.admin.execute(
        "CREATE TABLE public.fake_jobs (LIKE listener.jobs); "
        "CREATE TRIGGER t AFTER TRUNCATE ON public.fake_jobs "
        "FOR EACH STATEMENT EXECUTE FUNCTION listener.count_truncated_jobs()"
    )
    with pytest.raises(asyncpg.WrongObjectTypeError, match=r"listener\.jobs only"):
        await app.admin.execute("TRUNCATE public.fake_jobs")
    assert await app.admin.fetchval("SELECT count(*) FROM listener.deleted_rows") == 0


async def test_an_id_of_a_domain_type_is_stored_qualified_and_admitted(app: App) -> None:
    await app.admin.execute(
        "CREATE DOMAIN public.image_id AS bigint CHECK (VALUE > 0); "
        "CREATE TABLE public.domain_images (id public.image_id PRIMARY KEY, url text); "
        "SELECT listener.attach('public.domain_images', 'id', 'url')"
    )
    assert (
        await app.admin.fetchval(
            "SELECT id_type FROM listener.attachments WHERE source_table = 'public.domain_images'"
        )
        == "public.image_id"
    )
    await app.admin.execute("INSERT INTO public.domain_images VALUES (1, 'a'), (2, 'b')")
    assert await admit(app.admin) == 2
    assert (
        await app.admin.fetchval(
            "SELECT count(*) FROM listener.jobs WHERE source_table = 'public.domain_images'"
        )
        == 2
    )
    await app.admin.execute(
        f"GRANT EXECUTE ON FUNCTION listener.reanalyze(regclass, text[], integer) TO {app.tenant}"
    )
    tenant = await app.connect(app.alice)
    try:
        await tenant.execute(PLANT)
        await tenant.execute(
            "CREATE FUNCTION pg_temp.check_id(bigint) RETURNS boolean LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM pg_temp.pwn(); RETURN true; END$$; "
            "CREATE DOMAIN pg_temp.image_id AS bigint CHECK (pg_temp.check_id(VALUE))"
        )
        assert (
            await tenant.fetchval(
                "SELECT listener.reanalyze('public.domain_images', ARRAY['1', '2'], 0)"
            )
            == 2
        )
    finally:
        await tenant.close()
    assert await app.breaches() == []


# The advisory lock keys listener used before 0020: admission, the three rollups, migrate.
FORMER_KEYS = [
    7814717795847138676,
    7814717795881350259,
    7814717795930825573,
    7814717795897533552,
    int.from_bytes(b"lstnmigr", "big") & 0x7FFF_FFFF_FFFF_FFFF,
]


async def test_no_lock_a_tenant_can_take_stalls_admission_deletes_rollups_or_faces(
    app: App,
) -> None:
    (row,) = await rows_of(app, app.alice, 1)
    tenant = await app.connect(app.alice)
    try:
        for key in FORMER_KEYS:
            await tenant.execute("SELECT pg_advisory_lock($1)", key)
        await tenant.execute(
            "SELECT pg_advisory_lock(hashtext('listener.faces'), hashtext($1))", str(app.alice)
        )
        await app.admin.execute("SET statement_timeout = '5s'")
        await app.admin.execute(
            f"INSERT INTO {TABLE} (user_id, image_url) VALUES ($1, 'https://img.example/n')",
            app.alice,
        )
        assert await app.admin.fetchval("SELECT listener.admit_inserted_rows(100)") == 1
        await app.admin.execute(f"DELETE FROM {TABLE} WHERE id = $1", row)
        (claimed,) = await app.admin.fetch("SELECT * FROM listener.claim_deleted_rows(10, 0)")
        assert claimed["source_id"] == str(row)
        assert await app.admin.fetchval("SELECT listener.roll_up_job_counts()") > 0
        await app.admin.fetchval("SELECT listener.roll_up_face_review_counts()")
        await app.admin.fetchval("SELECT listener.roll_up_dedup_savings()")
        async with app.admin.transaction():
            await app.admin.execute("SELECT listener.lock_owner_faces($1)", str(app.alice))
        # Any lock on listener's lock tables needs rights on them.
        for sql in (
            "LOCK TABLE listener.admission_lock IN ROW SHARE MODE",
            "LOCK TABLE listener.locks IN ACCESS SHARE MODE",
            "SELECT * FROM listener.locks FOR UPDATE",
            "SELECT * FROM listener.admission_lock FOR SHARE",
        ):
            async with tenant.transaction():
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await tenant.execute(sql)
        # The one lock any role may take on any table (ACCESS SHARE, here through a size
        # function that opens the table by its oid), held in an open transaction.
        holding = tenant.transaction()
        await holding.start()
        await tenant.fetchval(
            "SELECT pg_relation_size('listener.admission_lock'::regclass) "
            "+ pg_relation_size('listener.locks'::regclass)"
        )

        (again,) = await app.admin.fetch("SELECT * FROM listener.claim_deleted_rows(10, 0)")
        assert again["source_id"] == str(row)
        await app.admin.execute(
            f"INSERT INTO {TABLE} (user_id, image_url) VALUES ($1, 'https://img.example/m')",
            app.alice,
        )
        assert await app.admin.fetchval("SELECT listener.admit_inserted_rows(100)") == 1
        await holding.rollback()
    finally:
        await app.admin.execute("RESET statement_timeout")
        await tenant.close()


async def test_listen_on_listener_events_hears_no_row_ids(app: App) -> None:
    """Any role can LISTEN on any channel: the payload names the table, job and status."""
    ids = await rows_of(app, app.bob, 2)
    await app.admin.execute("UPDATE listener.jobs SET status = 'pending', finished_at = NULL")
    heard: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    tenant = await app.connect(app.alice)
    try:
        await tenant.add_listener("listener_events", lambda *a: heard.put_nowait(json.loads(a[3])))
        await app.admin.execute(
            "UPDATE listener.jobs SET status = 'complete', finished_at = now() "
            "WHERE source_id = $1",
            str(ids[0]),
        )
        event = await asyncio.wait_for(heard.get(), 10)
        assert set(event) == {"table", "status", "job_id"}
        assert str(ids[0]) not in json.dumps(event)
        # Where every role that can connect is trusted, the operator turns row ids on.
        await app.admin.execute("UPDATE listener.event_settings SET notify_row_ids = true")
        await app.admin.execute(
            "UPDATE listener.jobs SET status = 'complete', finished_at = now() "
            "WHERE source_id = $1",
            str(ids[1]),
        )
        event = await asyncio.wait_for(heard.get(), 10)
        assert event["row_id"] == str(ids[1])
    finally:
        await tenant.close()


async def test_a_tenant_calls_no_listener_function_directly(app: App) -> None:
    """Even with USAGE on the schema: PUBLIC may execute none of listener's functions."""
    calls = [
        f"SELECT {r['name']}({r['args']})"
        for r in await app.admin.fetch(
            """
            SELECT p.oid::regproc::text AS name,
                   coalesce(string_agg('NULL::' || format_type(t, NULL), ', ' ORDER BY n), '')
                       AS args
            FROM pg_proc AS p
            LEFT JOIN LATERAL unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, n) ON true
            WHERE p.pronamespace = 'listener'::regnamespace
              AND p.prorettype <> 'trigger'::regtype
            GROUP BY p.oid
            """
        )
    ]
    assert len(calls) > 30
    tenant = await app.connect(app.alice)
    try:
        for call in calls:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await tenant.execute(call)
    finally:
        await tenant.close()


async def test_through_every_rpc_a_tenant_reaches_its_own_rows_only(app: App) -> None:
    faces = await seed_faces(app)
    alices = await rows_of(app, app.alice, 2)
    bobs = await rows_of(app, app.bob, 2)
    alice = await app.connect(app.alice)
    anonymous = await app.connect(None)
    try:
        # Re-analysis: asked for everyone's rows, only hers start over.
        assert await alice.fetchval("SELECT public.retag_images($1::uuid[])", alices + bobs) == 2
        pending = await app.admin.fetch(
            "SELECT source_id FROM listener.jobs WHERE status = 'pending'"
        )
        assert {r["source_id"] for r in pending} == {str(i) for i in alices}
        # Faces: her counts, people and suggestions; bob's ids are as unknown as none.
        counts = await alice.fetchrow("SELECT * FROM public.my_face_counts()")
        assert dict(counts) == {"people": 1, "faces": 2, "unassigned": 1, "open_suggestions": 1}
        suggestions = await alice.fetch("SELECT * FROM public.my_face_suggestions()")
        assert [r["face_id"] for r in suggestions] == [faces["alice_face"]]
        people = await alice.fetch("SELECT * FROM public.my_face_people()")
        assert [str(r["person_id"]) for r in people] == [faces["alice_person"]]
        for sql, args in (
            ("SELECT public.accept_face($1, $2)", (faces["bob_face"], faces["bob_candidate"])),
            ("SELECT public.reject_face($1, $2)", (faces["bob_face"], faces["bob_candidate"])),
            ("SELECT public.rename_person($1::bigint, 'x')", (int(faces["bob_person"]),)),
            (
                "SELECT public.merge_people($1::bigint, ARRAY[$2::bigint])",
                (int(faces["alice_person"]), int(faces["bob_person"])),
            ),
        ):
            with pytest.raises(asyncpg.NoDataFoundError):
                await alice.fetchval(sql, *args)
        # Signed out, nothing at all (not the faces of rows without an owner).
        assert await anonymous.fetchval("SELECT public.retag_images($1::uuid[])", alices) == 0
        assert await anonymous.fetch("SELECT * FROM public.my_face_counts()") == []
        assert (
            await anonymous.fetchval(
                "SELECT public.accept_face($1, $2)", faces["alice_face"], faces["alice_candidate"]
            )
            is None
        )
        # Bob's rows, faces and suggestion are as they were.
        assert (
            await app.admin.fetchval(
                "SELECT status FROM listener.face_suggestions WHERE face_id = $1", faces["bob_face"]
            )
            == "open"
        )
        assert (
            await app.admin.fetchval(
                "SELECT count(*) FROM listener.people WHERE owner_id = $1", str(app.bob)
            )
            == 1
        )
    finally:
        await alice.close()
        await anonymous.close()


async def test_re_analysis_is_bounded_per_owner_and_day(app: App) -> None:
    await app.admin.execute("UPDATE listener.reanalyze_limits SET per_owner_per_day = 3")
    alices = await rows_of(app, app.alice, 4)
    bobs = await rows_of(app, app.bob, 1)
    alice = await app.connect(app.alice)
    bob = await app.connect(app.bob)
    try:
        assert await alice.fetchval("SELECT public.retag_images($1::uuid[])", alices[:2]) == 2
        with pytest.raises(asyncpg.ProgramLimitExceededError, match="2 of 3 rows today, 2 asked"):
            await alice.fetchval("SELECT public.retag_images($1::uuid[])", alices[2:])
        # Refused as a whole: neither of the two started over.
        assert (
            await app.admin.fetchval("SELECT count(*) FROM listener.jobs WHERE status = 'pending'")
            == 2
        )
        assert await alice.fetchval("SELECT public.retag_images($1::uuid[])", alices[2:3]) == 1
        # Another tenant's quota is its own.
        assert await bob.fetchval("SELECT public.retag_images($1::uuid[])", bobs) == 1
    finally:
        await alice.close()
        await bob.close()
    # The operator's re-analysis has no quota.
    assert (
        await app.admin.fetchval(
            "SELECT listener.reanalyze_rows($1, $2, 0)", TABLE, [str(i) for i in alices]
        )
        == 4
    )
