"""``listener backfill``: enqueue the rows never analyzed, then follow them to completion.

Rows are chosen by table and owner (enqueued in chunks by a scan), or by ``--where`` and
``--limit-per-owner`` (selected read-only first, then enqueued by id). ``--dry-run`` counts
them and prints the cost estimate (``listener.cli.estimate``).
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from listener.cli.common import UserError, load_settings, open_pool, run_command
from listener.cli.estimate import print_estimate
from listener.cli.render import (
    console,
    print_backfill_summary,
    print_json,
    print_owner_counts,
    progress_bar,
)
from listener.db.queries import Queries, TableProgress


def backfill(
    table: Annotated[str, typer.Argument(help="An attached table.")],
    owner: Annotated[str | None, typer.Option(help="Only this owner's rows.")] = None,
    limit: Annotated[int | None, typer.Option(help="Enqueue at most N rows.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only count what would be enqueued.")] = False,
    no_wait: Annotated[bool, typer.Option(help="Enqueue and return; do not follow.")] = False,
    batch: Annotated[
        bool, typer.Option("--batch", help="Send OpenAI steps through the Batch API (half price).")
    ] = False,
    where: Annotated[
        str | None,
        typer.Option(help="Only rows matching this SQL predicate on TABLE (run read-only)."),
    ] = None,
    limit_per_owner: Annotated[
        int | None, typer.Option(help="Enqueue at most N rows of each owner.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON (implies --no-wait).")
    ] = False,
) -> None:
    """Enqueue the rows of TABLE that were never analyzed, then follow them to completion.

    --where and --limit-per-owner choose the rows first, in a READ ONLY transaction with your
    own rights (the predicate cannot write), then enqueue them by id. The summary lists, per
    owner, the jobs, their outcome and the faces found and auto-assigned, and why jobs failed.
    """
    if where is not None or limit_per_owner is not None:
        _backfill_selected(
            table, where, limit_per_owner, owner, limit, dry_run, no_wait, batch, as_json
        )
        return
    from listener.app_side.backfill import enqueue_backfill

    settings = load_settings()

    async def go() -> None:
        async with open_pool(settings) as pool:
            queries = Queries(pool)
            name = (await queries.attachment(table)).source_table
            if dry_run:
                count = await queries.count_unqueued(name, owner)
                if limit is not None:
                    count = min(count, limit)
                console.print(f"{count} rows would be enqueued (dry run: nothing was changed)")
                await print_estimate(settings, queries, name, owner, count)
                return
            # Ctrl+C stops enqueueing after the current chunk, or stops following.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)
            try:
                since = datetime.now(UTC)
                with console.status("enqueueing...") as spinner:
                    report = await enqueue_backfill(
                        queries,
                        name,
                        owner=owner,
                        limit=limit,
                        chunk_size=settings.backfill_chunk_size,
                        priority=settings.backfill_priority,
                        on_chunk=lambda s, e: spinner.update(
                            f"enqueueing: {e} of {s} rows scanned"
                        ),
                        stop=stop,
                        batch=True if batch else None,
                    )
                console.print(
                    f"enqueued {report.enqueued} jobs ({report.scanned} rows scanned, "
                    f"{report.seconds:.1f}s)"
                    + (
                        ": interrupted, run the same command again to continue"
                        if stop.is_set()
                        else ""
                    )
                )
                if no_wait or stop.is_set():
                    return
                await _follow_progress(queries, name, owner, since, stop)
                print_backfill_summary(*await queries.backfill_summary(name, None, since))
            finally:
                loop.remove_signal_handler(signal.SIGINT)

    run_command(go())


def _backfill_selected(
    table: str,
    where: str | None,
    limit_per_owner: int | None,
    owner: str | None,
    limit: int | None,
    dry_run: bool,
    no_wait: bool,
    batch: bool,
    as_json: bool,
) -> None:
    """``backfill --where/--limit-per-owner``: select read-only, then enqueue by id."""
    from listener.app_side.backfill import SelectionError, enqueue_rows, select_rows

    settings = load_settings()

    async def go() -> dict[str, Any]:
        async with open_pool(settings) as pool:
            queries = Queries(pool)
            attachment = await queries.attachment(table)
            name = attachment.source_table
            try:
                rows = await select_rows(
                    pool,
                    attachment,
                    where=where,
                    owner=owner,
                    limit_per_owner=limit_per_owner,
                    limit=limit,
                )
            except SelectionError as error:
                raise UserError(str(error)) from None
            selected: dict[str | None, int] = {}
            for row in rows:
                selected[row.owner] = selected.get(row.owner, 0) + 1
            doc: dict[str, Any] = {
                "dry_run": dry_run,
                "selected": len(rows),
                "by_owner": [{"owner": k, "selected": v} for k, v in selected.items()],
            }
            if dry_run:
                if not as_json:
                    print_owner_counts(doc["by_owner"], "rows that would be enqueued (dry run)")
                    await print_estimate(settings, queries, name, owner, len(rows))
                return doc
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)
            try:
                since = datetime.now(UTC)
                created = await enqueue_rows(
                    queries,
                    name,
                    [r.id for r in rows],
                    chunk_size=settings.backfill_chunk_size,
                    priority=settings.backfill_priority,
                    batch=True if batch else None,
                    stop=stop,
                )
                doc["enqueued"] = sum(created.values())
                if not as_json:
                    console.print(f"enqueued {doc['enqueued']} jobs ({len(rows)} rows selected)")
                if not (no_wait or as_json or stop.is_set()):
                    await _follow_progress(queries, name, owner, since, stop)
            finally:
                loop.remove_signal_handler(signal.SIGINT)
            ids = [r.id for r in rows]
            summary, failures = await queries.backfill_summary(name, ids, since)
            for entry in summary:
                entry["enqueued"] = created.get(entry["owner_id"], 0)
            doc.update(by_owner=summary, failures=failures)
            if not as_json:
                print_backfill_summary(summary, failures)
            return doc

    doc = run_command(go())
    if as_json:
        print_json(doc)


async def _follow_progress(
    queries: Queries, table: str, owner: str | None, since: datetime, stop: asyncio.Event
) -> None:
    """Show a progress bar of ``table``'s jobs until none is left or ``stop`` is set."""
    from listener.app_side.backfill import follow

    loop = asyncio.get_running_loop()
    first = await queries.table_progress(table, owner, since)
    started = loop.time()
    total = first.remaining + first.complete + first.failed
    with progress_bar() as bar:
        task = bar.add_task("analyzing", total=total, failed=0, rate=0.0, spend=0.0)

        def update(p: TableProgress) -> None:
            nonlocal total
            total = max(total, p.remaining + p.complete + p.failed)
            done = p.complete + p.failed
            rate = done / max(loop.time() - started, 1e-6)
            bar.update(
                task,
                total=total,
                completed=done,
                failed=p.failed,
                rate=rate,
                spend=p.spend_usd,
            )

        last = await follow(queries, table, owner, since, update, stop)
    word = "stopped following" if stop.is_set() else "done"
    console.print(
        f"{word}: {last.complete} complete, {last.failed} failed, {last.remaining} still queued, "
        f"${last.spend_usd:.4f} spent"
        + (
            " (the daemon keeps working on them; run the same command again to follow)"
            if last.remaining
            else ""
        )
    )
