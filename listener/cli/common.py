"""What every command shares: settings from options, the database, errors as exit codes.

A command builds ``Settings`` with ``load_settings`` (options override ``LISTENER_*``
variables), does its work in one coroutine run by ``run_command``, and opens the database with
``open_pool``. Errors a user can fix are printed as one line and exit with status 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import typer
from pydantic import ValidationError

from listener.cli.render import err_console, shown
from listener.db.connect import open_database
from listener.db.migrate import MigrationError
from listener.ops.logs import configure_logging
from listener.settings import Settings

T = TypeVar("T")


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def load_settings(**overrides: Any) -> Settings:
    """``Settings`` from ``LISTENER_*`` variables, with the options given (not None) on top.

    Configures logging as the settings say.

    Raises:
        UserError: the settings do not validate.
    """
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        raise UserError(f"invalid settings: {error}") from error
    configure_logging(settings.log_level, settings.log_json)
    return settings


def run_command(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; an error the user can fix is one line and exit status 2."""
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
async def open_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one or two connections to the database, closed on exit."""
    pool = await (await open_database(settings)).create_pool(1, 2)
    try:
        yield pool
    finally:
        await pool.close()
