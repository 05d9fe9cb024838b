"""``listener pause`` and ``listener resume``: an operator's stop of one provider or of all."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from listener.cli.common import load_settings, open_pool, run_command
from listener.cli.render import console
from listener.queue.pg_store import PgJobStore


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

    Daemons see it at once (one whose LISTEN connection is down: within one poll interval).
    With every provider of their pipeline paused
    they claim nothing; otherwise a job whose next step needs a paused provider is put back
    once, to wait until the pause ends. No job row is rewritten while the pause lasts.
    """
    from listener.queue.pauses import ALL
    from listener.queue.prune import parse_age

    settings = load_settings()
    until = datetime.now(UTC) + parse_age(duration) if duration else None

    async def go() -> None:
        async with open_pool(settings) as pool:
            await PgJobStore(pool).pause(provider or ALL, reason, until)

    run_command(go())
    what = provider or "the pipeline"
    console.print(f"paused {what}" + (f" until {until.isoformat()}" if until else ""))


def resume(
    provider: Annotated[
        str | None,
        typer.Argument(help="A paused provider; none: the pipeline; 'budget': jobs held by it."),
    ] = None,
) -> None:
    """Lift a pause and wake at once the jobs it held.

    Every daemon runs them at once: none holds them again on a reading of the pauses older
    than the resume (see docs/guides/operations.md, "Pause and resume").
    """
    from listener.queue.pauses import ALL

    settings = load_settings()

    async def go() -> tuple[bool, int]:
        async with open_pool(settings) as pool:
            return await PgJobStore(pool).resume(provider or ALL)

    lifted, woken = run_command(go())
    what = provider or "the pipeline"
    console.print(
        (f"resumed {what}" if lifted else f"{what} was not paused") + f"; {woken} jobs woken"
    )
