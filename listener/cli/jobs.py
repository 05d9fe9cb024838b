"""The operator's commands on jobs: status, retry, reanalyze, cancel, prune."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from listener.cli.common import UserError, load_settings, open_pool, run_command
from listener.cli.estimate import print_estimate
from listener.cli.render import console, print_json, print_status, shown
from listener.db.connect import open_database
from listener.db.queries import Queries
from listener.queue.pg_store import PgJobStore
from listener.queue.store import JobFilter


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the queue: jobs by status, the oldest pending job, the outboxes (rows waiting,
    oldest age), attached tables."""
    settings = load_settings()

    async def go() -> dict[str, Any]:
        from listener.ops.status import queue_status

        # One connection, its reads one after the other: opening a second one would cost
        # more than the reads themselves.
        conn = await (await open_database(settings)).connect()
        try:
            return await queue_status(Queries(conn), settings.budget_usd_per_day)
        finally:
            await conn.close()

    doc = run_command(go())
    if as_json:
        print_json(doc)
        return
    print_status(doc)


def _filters_text(reason: str | None, owner: str | None, table: str | None) -> str:
    parts = [f"reason contains {reason!r}" if reason else "", f"owner {owner}" if owner else ""]
    parts.append(f"table {table}" if table else "")
    return ", ".join(p for p in parts if p) or "no filter"


def retry(
    failed: Annotated[bool, typer.Option("--failed", help="Requeue failed jobs.")] = True,
    cancelled: Annotated[
        bool, typer.Option("--cancelled", help="Requeue cancelled jobs too.")
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Only jobs whose error contains this.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's jobs.")] = None,
    table: Annotated[str | None, typer.Option(help="Only this table's jobs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Requeue failed (and with --cancelled, cancelled) jobs that match the filters."""
    settings = load_settings()
    statuses = (["failed"] if failed else []) + (["cancelled"] if cancelled else [])

    async def go() -> list[int]:
        async with open_pool(settings) as pool:
            name = (await Queries(pool).attachment(table)).source_table if table else None
            return await PgJobStore(pool).requeue(JobFilter(tuple(statuses), reason, owner, name))

    ids = run_command(go())
    if as_json:
        print_json({"requeued": len(ids), "job_ids": ids})
    else:
        console.print(f"requeued {len(ids)} jobs ({shown(_filters_text(reason, owner, table))})")


def reanalyze(
    table: Annotated[str, typer.Argument(help="An attached table.")],
    row_id: Annotated[
        list[str] | None, typer.Option("--id", help="A row id (repeat for more).")
    ] = None,
    owner: Annotated[str | None, typer.Option(help="Every row of this owner.")] = None,
    where: Annotated[
        str | None, typer.Option(help="Rows matching this SQL predicate on TABLE (read-only).")
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every row of TABLE.")] = False,
    priority: Annotated[
        int | None, typer.Option(help="Job priority (default: the backfill priority).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Only count and estimate the cost.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Analyze chosen rows again from scratch, complete ones included (results replaced).

    Apps do the same from SQL: ``SELECT listener.reanalyze('public.images', ARRAY['42'], 0)``.
    """
    from listener.app_side.reanalyze import SelectionError, select_rows

    settings = load_settings()

    async def go() -> tuple[int, int]:
        async with open_pool(settings) as pool:
            queries = Queries(pool)
            attachment = await queries.attachment(table)
            try:
                rows = await select_rows(
                    pool,
                    attachment,
                    ids=row_id or (),
                    owner=owner,
                    where=where,
                    everything=everything,
                )
            except SelectionError as error:
                raise UserError(str(error)) from None
            if dry_run:
                if not as_json:
                    console.print(f"{len(rows)} rows would be analyzed again (dry run)")
                    await print_estimate(
                        settings, queries, attachment.source_table, None, len(rows)
                    )
                return len(rows), 0
            done = 0
            store = PgJobStore(pool)
            for start in range(0, len(rows), 10_000):
                done += await store.reanalyze(
                    attachment.source_table,
                    rows[start : start + 10_000],
                    settings.backfill_priority if priority is None else priority,
                )
            return len(rows), done

    count, done = run_command(go())
    if as_json:
        print_json({"rows": count, "reanalyzed": done, "dry_run": dry_run})
    elif not dry_run:
        console.print(f"{done} jobs started over ({count} rows selected)")


def cancel(
    reason: Annotated[str | None, typer.Option(help="Only jobs whose error contains this.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's jobs.")] = None,
    table: Annotated[str | None, typer.Option(help="Only this table's jobs.")] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Cancel every pending and running job.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Cancel pending, running and batched jobs that match the filters (`listener retry
    --cancelled` brings them back)."""
    if not (reason or owner or table or everything):
        raise typer.BadParameter("give --reason, --owner or --table, or --all")
    settings = load_settings()

    async def go() -> list[int]:
        async with open_pool(settings) as pool:
            name = (await Queries(pool).attachment(table)).source_table if table else None
            return await PgJobStore(pool).cancel(JobFilter((), reason, owner, name))

    ids = run_command(go())
    if as_json:
        print_json({"cancelled": len(ids), "job_ids": ids})
    else:
        console.print(f"cancelled {len(ids)} jobs ({shown(_filters_text(reason, owner, table))})")


def prune(
    older_than: Annotated[
        str, typer.Option(help="Finished at least this long ago (e.g. 30d, 12h).")
    ],
    dry_run: Annotated[bool, typer.Option(help="Only count what would be deleted.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete finished jobs (and their results) of app rows that no longer exist.

    Jobs of rows that still exist are kept, however old: their results are what the app reads,
    and a row without a job would be analyzed (and paid for) again by the next backfill.
    """
    from listener.queue.prune import parse_age, prune_all

    settings = load_settings()
    try:
        before = datetime.now(UTC) - parse_age(older_than)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    async def go() -> int:
        async with open_pool(settings) as pool:
            store = PgJobStore(pool)
            if dry_run:
                return await store.prune(before, 0, dry_run=True)
            return await prune_all(store, before, batch=settings.prune_batch)

    n = run_command(go())
    if as_json:
        print_json({"pruned": n, "dry_run": dry_run})
    else:
        console.print(
            f"{n} finished jobs of deleted rows "
            + ("would be pruned (dry run)" if dry_run else "pruned")
        )
