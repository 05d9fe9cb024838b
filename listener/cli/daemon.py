"""``listener migrate``, ``listener run`` and ``listener demo``: the schema and the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from listener.cli.common import UserError, load_settings, run_command
from listener.cli.render import console, err_console, shown
from listener.db.connect import open_database
from listener.db.migrate import migrate


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
    settings = load_settings()

    async def go() -> list[str]:
        # One transaction under a transaction-scoped lock: works through a transaction-mode
        # pooler.
        conn = await (await open_database(settings)).connect()
        try:
            return await migrate(conn, allow_superuser_owner=allow_superuser_owner)
        finally:
            await conn.close()

    applied = run_command(go())
    console.print(f"applied: {shown(', '.join(applied))}" if applied else "schema is up to date")


def run(
    concurrency: Annotated[int | None, typer.Option(help="Jobs running at once.")] = None,
    health_port: Annotated[int | None, typer.Option(help="Health server port (0: any).")] = None,
    pipeline: Annotated[
        str | None, typer.Option(help="local, noop or tiered (LISTENER_PIPELINE).")
    ] = None,
    migrate_first: Annotated[
        bool, typer.Option("--migrate", help="Apply migrations before starting.")
    ] = False,
) -> None:
    """Run the daemon until SIGTERM/SIGINT: LISTEN, claim, analyze, retry, reconcile."""
    from listener.app import Daemon, SchemaNotReady, run_until_signalled

    settings = load_settings(concurrency=concurrency, health_port=health_port, pipeline=pipeline)

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

    run_command(go())


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
    from listener.testing.cluster import termination_as_interrupt

    settings = load_settings()
    names = [p.strip() for p in providers.split(",") if p.strip()]
    # The embedded Postgres starts off the main thread: make SIGTERM and SIGHUP stop it (and
    # the daemon) the way Ctrl+C does, here where signal handlers can be installed.
    try:
        with termination_as_interrupt():
            run_command(
                run_demo(
                    settings,
                    images=images,
                    health_port=health_port,
                    keep_running=keep_running,
                    providers=names,
                )
            )
    except KeyboardInterrupt:
        if settings.database_url is None:
            err_console.print("demo stopped: everything it started was stopped and removed")
        else:
            err_console.print(
                "demo stopped: everything it started was stopped; what it installed in the "
                "database stays, as listed above"
            )
        raise typer.Exit(130) from None
