"""The hot statements keep their index plans at 1,000,000 jobs, custom and generic alike.

asyncpg prepares every statement, and after five executions Postgres may switch a prepared
statement to a generic plan, built without the parameter values. A generic plan of
``complete_jobs`` once scanned every processing job for every completion, and the drain of a
1M-row backfill stalled (see bench/README.md). This test builds a queue of that size and
EXPLAINs each statement the worker runs per job under both ``plan_cache_mode`` settings: no
sequential scan, and ``listener.jobs`` read only through the index each statement is meant to
use (the primary key for every statement that names its jobs by id).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import asyncpg
import pytest

from listener.db.connect import plan_each_execution
from listener.db.queries import load_queries

JOBS = 1_000_000

# The statements a worker runs for every job, with parameters for EXPLAIN (SQL literals), and
# the only indexes through which each may read listener.jobs.
BY_ID = {"jobs_pkey"}
ALLOWED = {
    "claim_jobs": {"jobs_claim_idx", "jobs_pkey"},
    "reap_expired_leases": {"jobs_lease_idx", "jobs_pkey"},
}
HOT = {
    "claim_jobs": "(20, 'w', 30.0, '{token}', 5, -2147483648, 0, 0)",
    "renew_leases": "(ARRAY[{ids}]::bigint[], ARRAY['{token}']::uuid[], 30.0)",
    "complete_jobs": (
        "(ARRAY[{ids}]::bigint[], ARRAY[{tokens}]::uuid[], ARRAY[{first}]::bigint[], "
        "ARRAY['s']::text[], ARRAY['p']::text[], ARRAY['{{}}']::jsonb[], ARRAY['m']::text[], "
        "ARRAY[1.0]::float8[], ARRAY[1]::int[], ARRAY[1]::int[], ARRAY[1]::int[], "
        "ARRAY[0.001]::numeric[], ARRAY[NULL]::bytea[], ARRAY[NULL]::bigint[])"
    ),
    "save_step": (
        "({first}, '{token}', 's', 'p', '{{}}', 'm', 1.0, 1, 1, 1, 0.001, "
        "sha256('x'), 42, 7, 'sha256', 0.001)"
    ),
    # Deduplication's look-ups, before every paid step: by digest, never a scan.
    "find_same_image": "('s', sha256('x'), {first}, 'owner', 'public.images', NULL, 200)",
    "find_similar_image": (
        "('s', -4539648440387803836, 3, {first}, 'owner', 'public.images', NULL, 200)"
    ),
    "retry_jobs": (
        "(ARRAY[{ids}]::bigint[], ARRAY[{tokens}]::uuid[], ARRAY[{delays}]::float8[], "
        "ARRAY[{errors}]::text[])"
    ),
    "snooze_jobs": (
        "(ARRAY[{ids}]::bigint[], ARRAY[{tokens}]::uuid[], ARRAY[{delays}]::float8[], "
        "ARRAY[{errors}]::text[], ARRAY[{errors}]::text[])"
    ),
    "discard_jobs": "(ARRAY[{ids}]::bigint[], ARRAY[{tokens}]::uuid[], ARRAY[{errors}]::text[])",
    "release_jobs": "(ARRAY[{ids}]::bigint[], ARRAY[{tokens}]::uuid[])",
    "reap_expired_leases": "(1000)",
    "job_outputs": "({first})",
}


@pytest.fixture
async def big_queue(conn: asyncpg.Connection) -> tuple[list[int], str]:
    """1M jobs: 700,000 complete with a result each, 100,000 pending, 200,000 processing.

    Many processing rows make a plan that finds jobs by lease (``jobs_lease_idx``) instead of
    by id as slow as it was in the stalled drain: every completion would visit them all.
    """
    token = str(uuid.uuid4())
    await conn.execute(
        """
        INSERT INTO listener.jobs (source_table, source_id, image_url, status, attempts,
                                   max_attempts, lease_token, lease_expires_at, finished_at)
        SELECT 'public.images', g::text, 'http://img/' || g,
               CASE WHEN g <= 700000 THEN 'complete'
                    WHEN g <= 800000 THEN 'pending' ELSE 'processing' END,
               1, 5,
               CASE WHEN g > 800000 THEN $2::uuid END,
               CASE WHEN g > 800000 THEN now() + interval '1 minute' END,
               CASE WHEN g <= 700000 THEN now() END
        FROM generate_series(1, $1) AS g
        """,
        JOBS,
        token,
    )
    await conn.execute(
        "INSERT INTO listener.results (job_id, step, provider, output) "
        "SELECT id, 'local.analysis', 'local', '{}' FROM listener.jobs WHERE status = 'complete'"
    )
    await conn.execute("ANALYZE listener.jobs; ANALYZE listener.results")
    ids = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM listener.jobs WHERE status = 'processing' ORDER BY id DESC LIMIT 20"
        )
    ]
    return ids, token


# listener.claim_jobs's parameters, in the order of the claim_jobs query's placeholders, then
# the function's variables the claim statement reads (0021: the priority range of the pass
# and the jobs already taken), with their types.
CLAIM_PARAMETERS = (
    ("p_limit", "integer"),
    ("p_worker", "text"),
    ("p_lease_s", "double precision"),
    ("p_token", "uuid"),
    ("p_default_max_attempts", "integer"),
    ("first_priority", "integer"),
    ("last_priority", "integer"),
    ("got", "bigint"),
)


async def claim_statement(conn: asyncpg.Connection) -> str:
    """The claim statement of ``listener.claim_jobs`` (0021), from the function's source
    between its "claim" markers, with its parameters and variables as $1..$8, as a
    PREPARE's ``(types) AS statement``: what PL/pgSQL plans, custom or generic, for the
    function's claim. EXPLAIN arguments: ``HOT["claim_jobs"]`` (the first pass)."""
    source = await conn.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = 'listener.claim_jobs(integer, text, "
        "double precision, uuid, integer, integer)'::regprocedure"
    )
    body = source.split("-- claim: begin", 1)[1].split("-- claim: end", 1)[0]
    statement = body.strip().removeprefix("RETURN QUERY").strip()
    for n, (name, _) in enumerate(CLAIM_PARAMETERS, start=1):
        statement = re.sub(rf"\b{name}\b", f"${n}", statement)
    assert "p_" not in statement, statement
    types = ", ".join(t for _, t in CLAIM_PARAMETERS)
    return f"({types}) AS {statement}"


def _scans(plan: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(node type, relation, index) of every scan node in a JSON plan."""
    found = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if "Relation Name" in node:
            found.append((node["Node Type"], node["Relation Name"], node.get("Index Name", "")))
        stack.extend(node.get("Plans", []))
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
async def test_hot_statements_keep_index_plans_at_a_million_jobs(
    conn: asyncpg.Connection, big_queue: tuple[list[int], str], mode: str
) -> None:
    ids, token = big_queue
    sql = load_queries()
    values = {
        "ids": ", ".join(map(str, ids)),
        "first": ids[0],
        "token": token,
        "tokens": ", ".join(f"'{token}'" for _ in ids),
        "delays": ", ".join("1.0" for _ in ids),
        "errors": ", ".join("'e'" for _ in ids),
    }
    await conn.execute(f"SET plan_cache_mode = {mode}")
    bad: dict[str, list[tuple[str, str, str]]] = {}
    for name, args in HOT.items():
        text = await claim_statement(conn) if name == "claim_jobs" else f"AS {sql[name].sql}"
        await conn.execute(f"PREPARE {name} {text.rstrip().rstrip(';')}")
        try:
            explained = await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) EXECUTE {name}{args.format(**values)}"
            )
        finally:
            await conn.execute(f"DEALLOCATE {name}")
        scans = _scans(json.loads(explained)[0]["Plan"])
        assert scans, f"{name}: no scan in the plan"
        allowed = ALLOWED.get(name, BY_ID)
        wrong = [
            s
            for s in scans
            if s[0] != "ModifyTable"
            and (s[0] == "Seq Scan" or (s[1] == "jobs" and s[2] not in allowed))
        ]
        if wrong:
            bad[name] = scans
    assert bad == {}, f"plans off their index under {mode}: {bad}"


# -- plans made on a fresh install, used as it grows ---------------------------------------

GROWN = 120_000
# Tables that grow with the work, and the only way each may be read: through an index.
GROWING = {"jobs", "inserted_rows", "images", "results"}
IMAGES_DDL = "CREATE TABLE public.images (id bigint PRIMARY KEY, url text)"


def function_statement(
    source: str, start: str, end: str, into: str, names: list[str], types: str
) -> str:
    """The statement of a PL/pgSQL function's source from ``start`` to ``end`` (inclusive),
    without its ``into`` clause, with the parameters ``names`` as $1, $2 ... of ``types``
    (``"(integer, text)"``): what PL/pgSQL prepares for that statement, as a PREPARE's
    ``(types) AS statement``."""
    body = source[source.index(start) :]
    body = body[: body.index(end) + len(end)].rstrip(";").replace(into, "")
    for n, name in enumerate(names, start=1):
        body = re.sub(rf"\b{name}\b", f"${n}", body)
    assert "p_" not in body, body
    return f"{types} AS {body}"


def off_index(plan: dict[str, Any], jobs_indexes: set[str] | None) -> list[str]:
    """The reads of a growing table in ``plan`` (a JSON plan) that are not through an index,
    or that read listener.jobs through another index than ``jobs_indexes`` (None: any).

    A bitmap heap scan counts as a read through the indexes of the bitmap index scans under
    it (a bitmap AND of the primary key and the index of every lease is two reads).
    """
    wrong = []
    stack = [plan]
    while stack:
        node = stack.pop()
        stack.extend(node.get("Plans", []))
        relation = node.get("Relation Name")
        if relation not in GROWING or node["Node Type"] == "ModifyTable":
            continue
        kind = node["Node Type"]
        if kind in ("Index Scan", "Index Only Scan"):
            indexes = {node["Index Name"]}
        elif kind == "Bitmap Heap Scan":
            indexes = set()
            below = list(node.get("Plans", []))
            while below:
                child = below.pop()
                below.extend(child.get("Plans", []))
                if child["Node Type"] == "Bitmap Index Scan":
                    indexes.add(child["Index Name"])
        else:
            wrong.append(f"{kind} on {relation}")
            continue
        if relation == "jobs" and jobs_indexes is not None and not indexes <= jobs_indexes:
            wrong.append(f"{kind} on {relation} through {sorted(indexes)}")
    return wrong


async def function_settings(conn: asyncpg.Connection, signature: str) -> list[str]:
    """The ``SET`` clauses of a function (``proconfig``), as ``name=value``."""
    config = await conn.fetchval(
        "SELECT proconfig FROM pg_proc WHERE oid = $1::regprocedure", signature
    )
    return list(config or [])


@pytest.mark.timeout(300)
async def test_plans_made_on_a_fresh_install_read_indexes_after_it_grows(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Every statement planned while listener.jobs, inserted_rows and the app's table are
    empty (a fresh install's first claim, admission and completion), then used on the same
    connection after they grew past 100,000 rows, reads them through indexes only.

    The daemon's statements run on a connection set up as its pool sets up each one
    (``plan_each_execution``), prepared and executed as asyncpg does, six times so Postgres
    may settle on a generic plan. A function's statement is prepared under the function's
    own SET clauses, as PL/pgSQL plans it. Autovacuum is off for the growing tables: an
    ANALYZE would make every connection plan again and hide a frozen plan.
    """
    await conn.execute(IMAGES_DDL)
    await conn.execute("SELECT listener.attach('public.images', 'id', 'url', NULL, NULL)")
    for table in ("listener.jobs", "listener.inserted_rows", "public.images", "listener.results"):
        await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    table_oid = await conn.fetchval("SELECT 'public.images'::regclass::oid")
    token = str(uuid.uuid4())
    sql = load_queries()
    admit_signature = (
        f"listener.admit_{table_oid}(bigint[], text[], integer, text, double precision, uuid, "
        "integer)"
    )
    entries_signature = (
        "listener.admit_entries(integer, integer, text, double precision, uuid, integer)"
    )
    claim_signature = "listener.claim_jobs(integer, text, double precision, uuid, integer, integer)"
    admit_source = await conn.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = $1::regprocedure", admit_signature
    )
    entries_source = await conn.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = $1::regprocedure", entries_signature
    )
    # name: (statement, settings it is planned under, EXPLAIN arguments before and after)
    statements: dict[str, tuple[str, list[str], str]] = {
        name: (sql[name].sql, [], args) for name, args in HOT.items() if name != "claim_jobs"
    }
    statements["claim_jobs"] = (
        await claim_statement(conn),
        await function_settings(conn, claim_signature),
        HOT["claim_jobs"],
    )
    statements["admit_entries"] = (
        function_statement(
            entries_source,
            "WITH taken AS (",
            "FROM taken AS t;",
            "INTO ids, tables, keys, stamps",
            ["p_limit"],
            "(integer)",
        ),
        await function_settings(conn, entries_signature),
        "(1000)",
    )
    statements["admit_table"] = (
        function_statement(
            admit_source,
            "WITH present AS (",
            "INTO made, claimed;",
            "INTO made, claimed",
            ["p_ids", "p_keys", "p_room", "p_worker", "p_lease_s", "p_token", "p_max_attempts"],
            "(bigint[], text[], integer, text, double precision, uuid, integer)",
        ),
        await function_settings(conn, admit_signature),
        "(ARRAY[{ids}]::bigint[], ARRAY[{keys}]::text[], 0, 'w', 30.0, '{token}', 5)",
    )

    worker = await asyncpg.connect(database_url)
    try:
        await plan_each_execution(worker)

        async def under(settings: list[str], statement: str) -> Any:
            """Run ``statement`` with a function's settings in force, then reset them."""
            names = [s.split("=", 1)[0] for s in settings if not s.startswith("search_path")]
            for setting in settings:
                name, value = setting.split("=", 1)
                if name != "search_path":
                    await worker.execute(f"SET {name} = {value}")
            try:
                return await worker.fetchval(statement)
            finally:
                for name in names:
                    await worker.execute(f"RESET {name}")
                await plan_each_execution(worker)

        empty = {
            "ids": "1",
            "first": 1,
            "keys": "'1'",
            "token": token,
            "tokens": f"'{token}'",
            "delays": "1.0",
            "errors": "'e'",
        }
        for name, (statement, settings, args) in statements.items():
            typed = statement if statement.startswith("(") else f"AS {statement}"
            await worker.execute(f"PREPARE {name} {typed.rstrip().rstrip(';')}")
            for _ in range(6):
                await worker.execute("BEGIN")
                await under(settings, f"EXECUTE {name}{args.format(**empty)}")
                await worker.execute("ROLLBACK")

        # The install grows: rows of the app, their entries, jobs in every state.
        await conn.execute(
            "ALTER TABLE public.images DISABLE TRIGGER USER;"
            f"INSERT INTO public.images SELECT g, 'http://img/' || g "
            f"FROM generate_series(1, {GROWN}) AS g;"
            "ALTER TABLE public.images ENABLE TRIGGER USER;"
            "INSERT INTO listener.inserted_rows (source_table, source_id) "
            f"SELECT 'public.images', g::text FROM generate_series(1, {GROWN}) AS g"
        )
        await conn.execute(
            """
            INSERT INTO listener.jobs (source_table, source_id, image_url, status, attempts,
                                       max_attempts, lease_token, lease_expires_at, finished_at)
            SELECT 'public.images', g::text, 'http://img/' || g,
                   CASE WHEN g % 3 = 0 THEN 'complete'
                        WHEN g % 3 = 1 THEN 'pending' ELSE 'processing' END,
                   1, 5,
                   CASE WHEN g % 3 = 2 THEN $2::uuid END,
                   CASE WHEN g % 3 = 2 THEN now() + interval '1 minute' END,
                   CASE WHEN g % 3 = 0 THEN now() END
            FROM generate_series(1, $1) AS g
            """,
            GROWN,
            token,
        )
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM listener.jobs WHERE status = 'processing' ORDER BY id LIMIT 20"
            )
        ]
        grown = {
            "ids": ", ".join(map(str, ids)),
            "first": ids[0],
            "keys": ", ".join(f"'{i}'" for i in range(1, 21)),
            "token": token,
            "tokens": ", ".join(f"'{token}'" for _ in ids),
            "delays": ", ".join("1.0" for _ in ids),
            "errors": ", ".join("'e'" for _ in ids),
        }
        bad: dict[str, list[tuple[str, str, str]]] = {}
        for name, (_, settings, args) in statements.items():
            explained = await under(
                settings, f"EXPLAIN (FORMAT JSON) EXECUTE {name}{args.format(**grown)}"
            )
            plan = json.loads(explained)[0]["Plan"]
            wrong = off_index(plan, ALLOWED.get(name, BY_ID) if name in HOT else None)
            if wrong:
                bad[name] = wrong
        assert bad == {}, f"plans made on empty tables, off their index at {GROWN:,} rows: {bad}"
    finally:
        await worker.close()
