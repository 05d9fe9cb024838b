"""What every command shares: settings from options, the database, errors as exit codes.

A command builds ``Settings`` with ``load_settings`` (options override ``LISTENER_*``
variables), does its work in one coroutine run by ``run_command``, and opens the database with
``open_pool``. Errors a user can fix are printed as one line and exit with status 2.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import typer
from loguru import logger
from pydantic import ValidationError
from pydantic_settings import DotEnvSettingsSource, SettingsError

from listener.cli.render import err_console, shown
from listener.cli.settings_check import invalid_settings, unknown_settings
from listener.db.connect import open_database
from listener.db.migrate import MigrationError
from listener.ops.logs import configure_logging
from listener.settings import Settings

T = TypeVar("T")


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def load_settings(**overrides: Any) -> Settings:
    """``Settings`` from ``LISTENER_*`` variables, with the options given (not None) on top.

    Configures logging as the settings say, then logs a warning per ``LISTENER_*`` name of the
    environment or ``.env`` that no setting reads (``listener.cli.settings_check``).

    Raises:
        typer.Exit: status 2, after one line per problem on stderr, when a value does not
            validate, or when ``strict_settings`` is on and a name is unknown.
    """
    options = {k: v for k, v in overrides.items() if v is not None}
    environ = dict(os.environ)
    dotenv_file = str(Settings.model_config.get("env_file") or ".env")
    try:
        source = DotEnvSettingsSource(Settings, case_sensitive=True)
    except (OSError, UnicodeDecodeError) as error:
        _print_lines("error", [f"cannot read {dotenv_file}: {error}"])
        raise typer.Exit(2) from None
    dotenv = {name: value or "" for name, value in source.env_vars.items()}
    try:
        settings = Settings(**options)
    except (ValidationError, SettingsError) as error:
        unknown = unknown_settings(environ, dotenv, dotenv_file)
        _print_lines("warning", [u.message() for u in unknown])
        _print_lines("error", invalid_settings(error, environ, dotenv, options))
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_json)
    unknown = unknown_settings(environ, dotenv, dotenv_file)
    if unknown and settings.strict_settings:
        _print_lines("error", [f"{u.message()} (LISTENER_STRICT_SETTINGS is on)" for u in unknown])
        raise typer.Exit(2)
    for name in unknown:
        logger.warning(name.message())
    return settings


def _print_lines(level: str, lines: list[str]) -> None:
    """Each line on stderr as ``error: ...`` or ``warning: ...``, never wrapped."""
    colour = "red" if level == "error" else "yellow"
    for line in lines:
        err_console.print(f"[{colour}]{level}:[/{colour}] {shown(line)}", soft_wrap=True)


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
