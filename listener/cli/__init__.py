"""The ``listener`` command line: run, migrate, attach, detach, backfill, status, demo, faces.

Each command parses its options, builds ``Settings`` (options override ``LISTENER_*``
variables), and calls into the package. Errors a user can fix are printed as one line and exit
with status 2; a daemon stopped by SIGTERM/SIGINT exits 0.

Every piece of data printed (table names, owner ids, URLs, errors, the text of an exception)
goes through ``listener.cli.render.shown``: redacted, control characters escaped, Rich markup
escaped, so nothing stored in a row can crash a command or write to the operator's terminal.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from listener.cli.render import shown
from listener.db.connect import open_database
from listener.db.migrate import MigrationError, migrate
from listener.db.queries import Queries, TableProgress
from listener.ops.logs import configure_logging
from listener.queue.pg_store import PgJobStore
from listener.queue.store import JobFilter
from listener.settings import Settings
from listener.testing.cluster import termination_as_interrupt

app = typer.Typer(
    name="listener",
    help="Guarantee AI analysis of every image row inserted into a Postgres table.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


ESTIMATE_SAMPLE = 20
"""Images fetched to learn the size distribution for a dry-run estimate."""


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _settings(**overrides: Any) -> Settings:
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        raise UserError(f"invalid settings: {error}") from error
    configure_logging(settings.log_level, settings.log_json)
    return settings


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except UserError as error:
        err_console.print(f"[red]error:[/red] {shown(error)}")
        raise typer.Exit(2) from None
    except (ValueError, MigrationError) as error:
        err_console.print(f"[red]error:[/red] {shown(error)}")
        raise typer.Exit(2) from None
    except (
        asyncpg.DuplicatePreparedStatementError,
        asyncpg.InvalidSQLStatementNameError,
    ) as error:
        # Named prepared statements lost or shared between clients: a transaction-mode pooler
        # that neither the URL nor a probe revealed (listener.db.connect).
        err_console.print(
            f"[red]error:[/red] {shown(getattr(error, 'message', None) or error)}: "
            "LISTENER_DATABASE_URL goes through a transaction-mode pooler; set "
            "LISTENER_POOLER=transaction (and, for `listener run`, LISTENER_LISTEN_DATABASE_URL "
            "to a direct connection)"
        )
        raise typer.Exit(2) from None
    except asyncpg.PostgresError as error:
        # str(error) already ends with a "HINT:" line: print the message and the hint once.
        message = getattr(error, "message", None) or str(error)
        hint = f" ({error.hint})" if getattr(error, "hint", None) else ""
        err_console.print(f"[red]error:[/red] {shown(message)}{shown(hint)}")
        raise typer.Exit(2) from None
    except OSError as error:
        err_console.print(f"[red]error:[/red] cannot reach the database: {shown(error)}")
        raise typer.Exit(2) from None


@asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await (await open_database(settings)).create_pool(1, 2)
    try:
        yield pool
    finally:
        await pool.close()


@app.command()
def migrate_cmd(
    allow_superuser_owner: Annotated[
        bool,
        typer.Option(
            "--allow-superuser-owner",
            help="Migrate even when the role listener_owner is a superuser (its SECURITY "
            "DEFINER functions then run as one).",
        ),
    ] = False,
) -> None:
    """Create or upgrade the `listener` schema (safe to run twice, and concurrently)."""
    settings = _settings()

    async def go() -> list[str]:
        # One transaction under a transaction-scoped lock: works through a transaction-mode
        # pooler.
        conn = await (await open_database(settings)).connect()
        try:
            return await migrate(conn, allow_superuser_owner=allow_superuser_owner)
        finally:
            await conn.close()

    applied = _run(go())
    console.print(f"applied: {shown(', '.join(applied))}" if applied else "schema is up to date")


@app.command()
def run(
    concurrency: Annotated[int | None, typer.Option(help="Jobs running at once.")] = None,
    health_port: Annotated[int | None, typer.Option(help="Health server port (0: any).")] = None,
    pipeline: Annotated[str | None, typer.Option(help="local or noop.")] = None,
    migrate_first: Annotated[
        bool, typer.Option("--migrate", help="Apply migrations before starting.")
    ] = False,
) -> None:
    """Run the daemon until SIGTERM/SIGINT: LISTEN, claim, analyze, retry, reconcile."""
    from listener.app import Daemon, SchemaNotReady, run_until_signalled

    settings = _settings(concurrency=concurrency, health_port=health_port, pipeline=pipeline)

    async def go() -> None:
        if migrate_first:
            conn = await (await open_database(settings)).connect()
            try:
                await migrate(conn)
            finally:
                await conn.close()
        try:
            await run_until_signalled(Daemon(settings))
        except SchemaNotReady as error:
            raise UserError(str(error)) from error

    _run(go())


@app.command()
def attach(
    table: Annotated[str, typer.Argument(help="The table, e.g. public.vehicle_images.")],
    id_column: Annotated[str, typer.Option(help="Column that identifies a row.")],
    url_column: Annotated[str, typer.Option(help="Column holding the image URL.")],
    owner_column: Annotated[str | None, typer.Option(help="Column holding the owner.")] = None,
    status_column: Annotated[
        str | None, typer.Option(help="Text column the job status is written back to.")
    ] = None,
    result_column: Annotated[
        str | None,
        typer.Option(help="jsonb column the step outputs are merged into, keyed by step."),
    ] = None,
    error_column: Annotated[
        str | None,
        typer.Option(help="Text column the last error is written to (cleared on success)."),
    ] = None,
    analyzed_at_column: Annotated[
        str | None,
        typer.Option(help="timestamptz column the completion time is written to."),
    ] = None,
) -> None:
    """Install the enqueue triggers on TABLE; the app that inserts rows stays unchanged.

    Re-attaching replaces the previous settings: give every write-back column again.
    """
    settings = _settings()

    async def go() -> str:
        async with _pool(settings) as pool:
            return await Queries(pool).attach(
                table,
                id_column,
                url_column,
                owner_column,
                status_column,
                result_column=result_column,
                error_column=error_column,
                analyzed_at_column=analyzed_at_column,
            )

    name = _run(go())
    console.print(f"attached to {shown(name)}: new rows and changed URLs are enqueued")


@app.command()
def detach(table: Annotated[str, typer.Argument(help="An attached table.")]) -> None:
    """Remove the enqueue triggers from TABLE (its jobs and results stay)."""
    settings = _settings()

    async def go() -> bool:
        async with _pool(settings) as pool:
            return await Queries(pool).detach(table)

    if _run(go()):
        console.print(f"detached from {shown(table)}")
    else:
        console.print(f"{shown(table)} was not attached")


@app.command()
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

    settings = _settings()

    async def go() -> None:
        async with _pool(settings) as pool:
            queries = Queries(pool)
            name = (await queries.attachment(table)).source_table
            if dry_run:
                count = await queries.count_unqueued(name, owner)
                if limit is not None:
                    count = min(count, limit)
                console.print(f"{count} rows would be enqueued (dry run: nothing was changed)")
                await _print_estimate(settings, queries, name, owner, count)
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
                        max_attempts=settings.max_attempts,
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
                await _print_summary(queries, name, None, since, {})
            finally:
                loop.remove_signal_handler(signal.SIGINT)

    _run(go())


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

    settings = _settings()

    async def go() -> dict[str, Any]:
        async with _pool(settings) as pool:
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
                    _print_owner_counts(doc["by_owner"], "rows that would be enqueued (dry run)")
                    await _print_estimate(settings, queries, name, owner, len(rows))
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
                    max_attempts=settings.max_attempts,
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
                await _print_summary(queries, name, ids, since, created, (summary, failures))
            return doc

    doc = _run(go())
    if as_json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")


def _print_owner_counts(rows: list[dict[str, Any]], title: str) -> None:
    table_out = Table(title=title)
    table_out.add_column("owner")
    table_out.add_column("rows", justify="right")
    for row in rows:
        table_out.add_row(str(row["owner"]), str(row["selected"]))
    table_out.add_row("[bold]all[/bold]", f"[bold]{sum(r['selected'] for r in rows)}[/bold]")
    console.print(table_out)


async def _print_summary(
    queries: Queries,
    table: str,
    ids: list[str] | None,
    since: datetime,
    created: dict[str | None, int],
    read: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
) -> None:
    """The backfill's summary: per owner jobs, outcomes and faces; why jobs failed."""
    summary, failures = read or await queries.backfill_summary(table, ids, since)
    if not summary:
        return
    out = Table(title="backfill summary by owner")
    names = ("jobs", "complete", "failed", "remaining", "faces_found", "faces_assigned")
    out.add_column("owner")
    for name in names:
        out.add_column(name.replace("_", " "), justify="right")
    for row in summary:
        out.add_row(str(row["owner_id"]), *(str(row[k]) for k in names))
    console.print(out)
    if failures:
        reasons = Table(title="failures")
        reasons.add_column("jobs", justify="right")
        reasons.add_column("reason")
        for row in failures:
            reasons.add_row(str(row["count"]), str(row["reason"]))
        console.print(reasons)


async def _print_estimate(
    settings: Settings, queries: Queries, table: str, owner: str | None, count: int
) -> None:
    """Per tier and provider: images, calls, tokens, USD realtime and batch, time."""
    from listener.analysis.estimate import StepHistory, estimate
    from listener.analysis.fetch import ImageFetcher
    from listener.analysis.pipeline import build_plan
    from listener.analysis.providers.openai import OpenAIProvider

    plan = build_plan(settings.pipeline, settings.tiers)
    sizes: list[tuple[int, int]] = []
    if any(s.provider == "openai" for s in plan.steps) and count:
        fetcher = ImageFetcher(settings.fetch)
        await fetcher.start()
        try:
            for url in await queries.sample_unqueued(table, owner, ESTIMATE_SAMPLE):
                try:
                    fetched = await fetcher.fetch(url)
                except Exception:
                    continue
                sizes.append((fetched.width, fetched.height))
        finally:
            await fetcher.close()
    tier1 = [s.name for s in plan.steps if s.tier == 1]
    history = {
        r["step"]: StepHistory(
            r["results"],
            r["input_tokens"],
            r["output_tokens"],
            r["calls"],
            r["pass_rate"],
            r["reuse_rate"],
        )
        for r in await queries.step_history(tier1)
    }
    prompts = {}
    if any(s.provider == "openai" for s in plan.steps):
        writer = OpenAIProvider(settings.openai)
        prompts = {kind: writer.prompt(kind, {}) for kind in ("tier1", "tier2", "tier3")}
    dedup = settings.dedup != "off"
    result = estimate(plan, count, sizes, history, settings, prompts, dedup=dedup)
    table_out = Table(title=f"estimate for {count} images ({len(sizes)} sampled for sizes)")
    for column in ("step", "tier", "images", "calls", "input tok", "output tok"):
        table_out.add_column(column, justify="left" if column == "step" else "right")
    for column in ("realtime USD", "batch USD", "basis"):
        table_out.add_column(column, justify="left" if column == "basis" else "right")
    for s in result.steps:
        table_out.add_row(
            shown(s.step),
            str(s.tier),
            str(s.images),
            str(s.calls),
            str(s.input_tokens),
            str(s.output_tokens),
            f"{s.realtime_usd:.4f}",
            f"{s.batch_usd:.4f}",
            shown(s.basis),
        )
    table_out.add_row(
        "[bold]total[/bold]",
        "",
        "",
        "",
        "",
        "",
        f"[bold]{result.realtime_usd:.4f}[/bold]",
        f"[bold]{result.batch_usd:.4f}[/bold]",
        "",
    )
    console.print(table_out)
    if result.bottleneck:
        limit = settings.rate_limit(result.bottleneck)
        console.print(
            f"time at the rate limits: about {result.seconds / 60:.1f} min "
            f"({shown(result.bottleneck)} at {limit.rps:g} requests/s)"
        )
    else:
        console.print("time at the rate limits: no finite rate limit applies")
    if dedup:
        saved = await queries.dedup_totals(datetime.now(UTC).date())
        steps = sum(int(d["steps_total"]) for d in saved.values())
        usd = sum(float(d["usd_total"]) for d in saved.values())
        share = result.dedup_usd / result.realtime_usd if result.realtime_usd else 0.0
        console.print(
            f"deduplication ({shown(settings.dedup)}, scope {shown(settings.dedup_scope)}): "
            f"so far {steps} steps reused, ${usd:.6f} saved; at the recent reuse rate these "
            f"images would save about ${result.dedup_usd:.6f} ({share:.0%} of the realtime "
            "total; duplicates are known only once the images are fetched)"
        )
    else:
        console.print("deduplication: off (LISTENER_DEDUP): duplicate images are paid again")
    if settings.budget_usd_per_day is not None and result.realtime_usd:
        days = result.realtime_usd / settings.budget_usd_per_day
        console.print(f"budget: ${settings.budget_usd_per_day:.2f}/day -> about {days:.1f} days")


async def _follow_progress(
    queries: Queries, table: str, owner: str | None, since: datetime, stop: asyncio.Event
) -> None:
    """Show a progress bar of ``table``'s jobs until none is left or ``stop`` is set."""
    from listener.app_side.backfill import follow

    loop = asyncio.get_running_loop()
    first = await queries.table_progress(table, owner, since)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]:.1f}/s"),
        TextColumn("${task.fields[spend]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    started = loop.time()
    total = first.remaining + first.complete + first.failed
    with Progress(*columns, console=console) as bar:
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


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the queue: jobs by status, the oldest pending job, attached tables."""
    settings = _settings()

    async def go() -> dict[str, Any]:
        from listener.ops.status import queue_status

        # One connection, its reads one after the other: opening a second one would cost
        # more than the reads themselves.
        conn = await (await open_database(settings)).connect()
        try:
            return await queue_status(Queries(conn), settings.budget_usd_per_day)
        finally:
            await conn.close()

    doc = _run(go())
    if as_json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
        return
    _print_status(doc)


def _print_status(doc: dict[str, Any]) -> None:
    statuses = ("pending", "processing", "batched", "complete", "failed", "cancelled")
    table = Table(title="listener jobs")
    table.add_column("table")
    for key in statuses:
        table.add_column(key, justify="right")
    for row in doc["by_table"]:
        table.add_row(shown(row["table"]), *(shown(row[k]) for k in statuses))
    table.add_row("[bold]all[/bold]", *(f"[bold]{doc[k]}[/bold]" for k in statuses))
    console.print(table)
    if doc["by_owner"]:
        owners = Table(title=f"owners with the most work left (top {len(doc['by_owner'])})")
        for name in ("table", "owner", "pending", "processing", "complete", "failed"):
            owners.add_column(name, justify="left" if name in ("table", "owner") else "right")
        for row in doc["by_owner"]:
            owners.add_row(
                shown(row["table"]),
                shown(row["owner"]),
                *(shown(row[k]) for k in ("pending", "processing", "complete", "failed")),
            )
        console.print(owners)
    if doc["failure_reasons"]:
        reasons = Table(title="top failure reasons")
        reasons.add_column("jobs", justify="right")
        reasons.add_column("reason")
        for row in doc["failure_reasons"]:
            reasons.add_row(shown(row["count"]), shown(row["reason"]))
        console.print(reasons)
    eta = doc["eta_s"]
    console.print(
        f"throughput: {doc['rate_per_s']:.2f} jobs/s (last 5 min); "
        + (f"ETA {eta / 60:.1f} min" if eta is not None else "ETA -")
        + f"; oldest pending: {doc['oldest_pending_s']:.1f}s"
    )
    batches = doc["open_batches"]
    console.print(
        f"open batches: {len(batches)}"
        + "".join(
            f"\n  {shown(b['id'])} {shown(b['status'])} ({shown(b['requests'])} requests)"
            for b in batches
        )
    )
    waiting = doc.get("face_suggestions_open", 0)
    console.print(
        f"faces to review: {shown(waiting)} open suggestions"
        + (
            " ("
            + ", ".join(
                f"{'(no owner)' if r['owner'] is None else shown(r['owner'])}: "
                f"{shown(r['suggestions'])}"
                for r in doc.get("face_suggestions_by_owner", [])
            )
            + "; `listener faces suggestions --owner OWNER`)"
            if waiting
            else ""
        )
    )
    console.print(f"attached tables: {shown(', '.join(doc['tables'])) or 'none'}")
    budget = doc["budget_usd_per_day"]
    spend = f"spend: ${doc['spend_usd_today']:.4f} today, ${doc['spend_usd_total']:.4f} in all"
    if budget is not None:
        spend += f"; budget ${budget:.2f}/day" + (
            " [red]REACHED: paid providers wait until 00:00 UTC[/red]"
            if doc["budget_exhausted"]
            else ""
        )
    console.print(spend)
    if doc["dedup_reused_steps_total"]:
        console.print(
            f"deduplication saved: ${doc['dedup_saved_usd_today']:.6f} today "
            f"({doc['dedup_reused_steps_today']} steps reused), "
            f"${doc['dedup_saved_usd_total']:.6f} in all "
            f"({doc['dedup_reused_steps_total']} steps)"
        )
    for pause in doc["operator_pauses"]:
        what = "pipeline" if pause["provider"] == "*" else pause["provider"]
        left = pause["remaining_s"]
        console.print(
            f"[yellow]{what} paused by operator "
            + ("until resumed" if left is None else f"for {left:.0f}s")
            + f"[/yellow]: {pause['reason'] or 'no reason given'}"
        )
    for name, pause in doc["paused_providers"].items():
        console.print(
            f"[yellow]{shown(name)} paused for {pause['remaining_s']:.0f}s[/yellow]: "
            f"{shown(pause['reason'])}"
        )


def _filters_text(reason: str | None, owner: str | None, table: str | None) -> str:
    parts = [f"reason contains {reason!r}" if reason else "", f"owner {owner}" if owner else ""]
    parts.append(f"table {table}" if table else "")
    return ", ".join(p for p in parts if p) or "no filter"


@app.command()
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
    settings = _settings()
    statuses = (["failed"] if failed else []) + (["cancelled"] if cancelled else [])

    async def go() -> list[int]:
        async with _pool(settings) as pool:
            name = (await Queries(pool).attachment(table)).source_table if table else None
            return await PgJobStore(pool).requeue(JobFilter(tuple(statuses), reason, owner, name))

    ids = _run(go())
    if as_json:
        sys.stdout.write(json.dumps({"requeued": len(ids), "job_ids": ids}) + "\n")
    else:
        console.print(f"requeued {len(ids)} jobs ({shown(_filters_text(reason, owner, table))})")


@app.command()
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

    settings = _settings()

    async def go() -> tuple[int, int]:
        async with _pool(settings) as pool:
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
                    await _print_estimate(
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

    count, done = _run(go())
    if as_json:
        sys.stdout.write(json.dumps({"rows": count, "reanalyzed": done, "dry_run": dry_run}) + "\n")
    elif not dry_run:
        console.print(f"{done} jobs started over ({count} rows selected)")


@app.command()
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
    settings = _settings()

    async def go() -> list[int]:
        async with _pool(settings) as pool:
            name = (await Queries(pool).attachment(table)).source_table if table else None
            return await PgJobStore(pool).cancel(JobFilter((), reason, owner, name))

    ids = _run(go())
    if as_json:
        sys.stdout.write(json.dumps({"cancelled": len(ids), "job_ids": ids}) + "\n")
    else:
        console.print(f"cancelled {len(ids)} jobs ({shown(_filters_text(reason, owner, table))})")


@app.command()
def demo(
    images: Annotated[
        Path | None, typer.Option(help="A folder of your own photos (default: bundled).")
    ] = None,
    health_port: Annotated[int, typer.Option(help="Health server port (0: any).")] = 8080,
    keep_running: Annotated[
        bool, typer.Option(help="Keep the daemon and health server up until Ctrl+C.")
    ] = False,
    providers: Annotated[
        str,
        typer.Option(
            help="Cloud providers to add, against local fakes of their APIs: "
            "openai,rekognition (the tiered pipeline without credentials)."
        ),
    ] = "",
) -> None:
    """Run the whole pipeline on real photos: embedded Postgres, triggers, backfill, daemon."""
    from listener.cli.demo import run_demo

    settings = _settings()
    names = [p.strip() for p in providers.split(",") if p.strip()]
    # The embedded Postgres starts off the main thread: make SIGTERM and SIGHUP stop it (and
    # the daemon) the way Ctrl+C does, here where signal handlers can be installed.
    try:
        with termination_as_interrupt():
            _run(
                run_demo(
                    settings,
                    images=images,
                    health_port=health_port,
                    keep_running=keep_running,
                    providers=names,
                )
            )
    except KeyboardInterrupt:
        err_console.print("demo stopped: everything it started was stopped and removed")
        raise typer.Exit(130) from None


@app.command()
def pause(
    provider: Annotated[
        str | None, typer.Argument(help="A provider (openai, rekognition, ...); none: all.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Shown in status.")] = None,
    duration: Annotated[
        str | None, typer.Option("--for", help="End the pause after this long (e.g. 2h).")
    ] = None,
) -> None:
    """Stop work for PROVIDER (or, without one, stop claiming at all) until `listener resume`.

    Daemons see it within one poll interval. With every provider of their pipeline paused
    they claim nothing; otherwise a job whose next step needs a paused provider is put back
    once, to wait until the pause ends. No job row is rewritten while the pause lasts.
    """
    from listener.queue.pauses import ALL
    from listener.queue.prune import parse_age

    settings = _settings()
    until = datetime.now(UTC) + parse_age(duration) if duration else None

    async def go() -> None:
        async with _pool(settings) as pool:
            await Queries(pool).set_pause(provider or ALL, reason, until)

    _run(go())
    what = provider or "the pipeline"
    console.print(f"paused {what}" + (f" until {until.isoformat()}" if until else ""))


@app.command()
def resume(
    provider: Annotated[
        str | None,
        typer.Argument(help="A paused provider; none: the pipeline; 'budget': jobs held by it."),
    ] = None,
) -> None:
    """Lift a pause and wake at once the jobs it held."""
    from listener.queue.pauses import ALL

    settings = _settings()

    async def go() -> tuple[bool, int]:
        async with _pool(settings) as pool:
            lifted = await Queries(pool).delete_pause(provider or ALL)
            woken = await PgJobStore(pool).wake_held(provider or ALL)
            return lifted, woken

    lifted, woken = _run(go())
    what = provider or "the pipeline"
    console.print(
        (f"resumed {what}" if lifted else f"{what} was not paused") + f"; {woken} jobs woken"
    )


@app.command()
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

    settings = _settings()
    try:
        before = datetime.now(UTC) - parse_age(older_than)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    async def go() -> int:
        async with _pool(settings) as pool:
            store = PgJobStore(pool)
            if dry_run:
                return await store.prune(before, 0, dry_run=True)
            return await prune_all(store, before, batch=settings.prune_batch)

    n = _run(go())
    if as_json:
        sys.stdout.write(json.dumps({"pruned": n, "dry_run": dry_run}) + "\n")
    else:
        console.print(
            f"{n} finished jobs of deleted rows "
            + ("would be pruned (dry run)" if dry_run else "pruned")
        )


# Typer names commands after functions; `migrate` would shadow the imported function.
app.registered_commands[0].name = "migrate"

# Imported last: the faces commands use this module's helpers.
from listener.cli.faces import faces_app  # noqa: E402

app.add_typer(faces_app, name="faces")


def main() -> None:
    """Entry point of the ``listener`` console script."""
    app()
