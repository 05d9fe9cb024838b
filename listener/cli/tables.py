"""``listener attach`` and ``listener detach``: the enqueue triggers on the app's tables."""

from __future__ import annotations

from typing import Annotated

import typer

from listener.cli.common import load_settings, open_pool, run_command
from listener.cli.render import console, shown
from listener.db.queries import Queries


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
    settings = load_settings()

    async def go() -> str:
        async with open_pool(settings) as pool:
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

    name = run_command(go())
    console.print(f"attached to {shown(name)}: new rows and changed URLs are enqueued")


def detach(table: Annotated[str, typer.Argument(help="An attached table.")]) -> None:
    """Remove the enqueue triggers from TABLE (its jobs and results stay)."""
    settings = load_settings()

    async def go() -> bool:
        async with open_pool(settings) as pool:
            return await Queries(pool).detach(table)

    if run_command(go()):
        console.print(f"detached from {shown(table)}")
    else:
        console.print(f"{shown(table)} was not attached")
