"""The ``listener`` command line: run, migrate, attach, detach, backfill, status, demo, faces.

Each command parses its options, builds ``Settings`` (options override ``LISTENER_*``
variables), and calls into the package. Errors a user can fix are printed as one line and exit
with status 2; a daemon stopped by SIGTERM/SIGINT exits 0.

Every piece of data printed (table names, owner ids, URLs, errors, the text of an exception)
goes through ``listener.cli.render.shown``: redacted, control characters escaped, Rich markup
escaped, so nothing stored in a row can crash a command or write to the operator's terminal.

This module only assembles the app; the commands live by group:

- ``daemon``: migrate, run, demo (whose work is in ``demo``)
- ``tables``: attach, detach
- ``backfill``: backfill (its dry run's cost estimate in ``estimate``)
- ``jobs``: status, retry, reanalyze, cancel, prune
- ``pauses``: pause, resume
- ``faces``: the ``faces`` group
- ``common``: settings, the database, errors as exit codes; ``render``: what is printed
- ``settings_check``: unknown ``LISTENER_*`` names and invalid values, in the user's terms
"""

from __future__ import annotations

import typer

from listener.cli import backfill, daemon, jobs, pauses, tables
from listener.cli.faces import faces_app

app = typer.Typer(
    name="listener",
    help="Guarantee AI analysis of every image row inserted into a Postgres table.",
    no_args_is_help=True,
    add_completion=False,
)

# In this order in `listener --help`.
app.command("migrate")(daemon.migrate_cmd)
app.command("run")(daemon.run)
app.command("attach")(tables.attach)
app.command("detach")(tables.detach)
app.command("backfill")(backfill.backfill)
app.command("status")(jobs.status)
app.command("retry")(jobs.retry)
app.command("reanalyze")(jobs.reanalyze)
app.command("cancel")(jobs.cancel)
app.command("demo")(daemon.demo)
app.command("pause")(pauses.pause)
app.command("resume")(pauses.resume)
app.command("prune")(jobs.prune)
app.add_typer(faces_app, name="faces")


def main() -> None:
    """Entry point of the ``listener`` console script."""
    app()
