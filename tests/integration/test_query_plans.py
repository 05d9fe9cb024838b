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
    "claim_jobs": "(20, 'w', 30.0, '{token}', 5)",
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


# listener.claim_jobs's parameters, in the order of the claim_jobs query's placeholders.
CLAIM_PARAMETERS = ("p_limit", "p_worker", "p_lease_s", "p_token", "p_default_max_attempts")


async def claim_statement(conn: asyncpg.Connection) -> str:
    """The claim statement of ``listener.claim_jobs`` (0019), from the function's source
    between its "claim" markers, with its parameters as $1..$5: what PL/pgSQL plans, custom
    or generic, for the function's claim."""
    source = await conn.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = 'listener.claim_jobs(integer, text, "
        "double precision, uuid, integer, integer)'::regprocedure"
    )
    body = source.split("-- claim: begin", 1)[1].split("-- claim: end", 1)[0]
    statement = body.strip().removeprefix("RETURN QUERY").strip()
    for n, name in enumerate(CLAIM_PARAMETERS, start=1):
        statement = re.sub(rf"\b{name}\b", f"${n}", statement)
    assert "p_" not in statement, statement
    return statement


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
        text = await claim_statement(conn) if name == "claim_jobs" else sql[name].sql
        await conn.execute(f"PREPARE {name} AS {text.rstrip().rstrip(';')}")
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
