"""The CLI prints data from rows and providers as text: no markup, no escape sequences.

Owner ids, table names and errors hold Rich markup (``[/]`` crashed ``listener status``;
``[bold green]ALL OK[/]`` rendered as green text) and terminal escape sequences (an OSC title,
an OSC 8 hyperlink, a CSI clear screen). Printed, they must show as inert text: the command
succeeds, its output holds no ESC or BEL byte, and the markup is shown literally.
"""

from __future__ import annotations

import json
import subprocess

import asyncpg
from awaiting import jobs_finished
from support import RecordingProvider, admit, cli, fast_settings

from listener.app import Daemon
from listener.cli.render import shown
from listener.errors import ListenerError, RejectedByProvider

OSC_TITLE = "\x1b]0;pwned title\x07"
OSC8_LINK = "\x1b]8;;http://evil.example/\x1b\\click me\x1b]8;;\x1b\\"
CLEAR = "\x1b[2J\x1b[H"
MARKUP = "[bold green]ALL OK[/]"
OWNERS = ["[/]", f"owner{OSC_TITLE}", f"link {OSC8_LINK}", MARKUP]
ERRORS = [f"{MARKUP} {OSC_TITLE}", f"[/] {CLEAR}", f"{OSC8_LINK} \x9b31m C1 CSI", "[/red] x"]
TABLE = '"[/]images[red]"'


def assert_inert(result: subprocess.CompletedProcess[str]) -> None:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    for byte in ("\x1b", "\x07", "\x9b"):
        assert byte not in text, (byte, text)


async def test_status_shows_hostile_owners_errors_and_tables_as_text(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    await conn.execute(
        f"CREATE TABLE public.{TABLE} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "url text, owner_id text)"
    )
    await conn.execute(f"SELECT listener.attach('public.{TABLE}', 'id', 'url', 'owner_id')")
    failures: dict[str, list[ListenerError]] = {
        str(i + 1): [RejectedByProvider(error)] for i, error in enumerate(ERRORS)
    }
    provider = RecordingProvider(failures=failures)
    async with Daemon(fast_settings(database_url), providers=[provider]) as daemon:
        await conn.executemany(
            f"INSERT INTO public.{TABLE} (url, owner_id) VALUES ('u', $1)",
            [(owner,) for owner in OWNERS],
        )
        await jobs_finished(daemon, conn, len(OWNERS), timeout=20)
    # One more row each, left pending: the owners table lists the owners with work left.
    await conn.executemany(
        f"INSERT INTO public.{TABLE} (url, owner_id) VALUES ('u', $1)",
        [(owner,) for owner in OWNERS],
    )
    assert await admit(conn) == len(OWNERS)

    env = env_for_subprocess
    status = cli(env, "status")
    assert status.returncode == 0, status.stderr
    assert_inert(status)
    # Markup is shown as the text it is, in the owners table and in the failure reasons.
    assert MARKUP in status.stdout
    assert "[/]images[red]" in status.stdout
    assert "owner\\x1b]0;pwned title\\x07" in status.stdout

    as_json = cli(env, "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert_inert(as_json)
    doc = json.loads(as_json.stdout)
    assert {row["owner"] for row in doc["by_owner"]} == set(OWNERS)  # JSON keeps the data

    for args in (
        ["detach", "[/]"],
        ["detach", f"x{OSC_TITLE}"],
        ["cancel", "--owner", MARKUP],
        ["retry", "--reason", f"[/]{CLEAR}"],
        ["backfill", "[bold]nope[/]", "--dry-run"],
    ):
        result = cli(env, *args)
        assert result.returncode in (0, 2), (args, result.stderr)
        assert_inert(result)
    cancelled = cli(env, "cancel", "--owner", MARKUP)
    assert f"owner {MARKUP}" in cancelled.stdout


def test_shown_escapes_markup_and_control_characters() -> None:
    assert shown("[/]") == "\\[/]"
    assert shown(MARKUP) == "\\[bold green]ALL OK\\[/]"
    assert shown(OSC_TITLE) == "\\x1b]0;pwned title\\x07"
    assert shown("a\u202eb\u2028c\x00d\x9be") == "a\\u202eb\\u2028c\\x00d\\x9be"
    assert shown("tab\tand\nnewline") == "tab\\tand\\nnewline"
    assert shown("é 漢字 🙂") == "é 漢字 🙂"
    assert shown(None) == ""
    assert shown(42) == "42"
    # It redacts too: a secret in an error printed by the CLI is masked.
    assert shown("https://u:pw@h/a.jpg?token=t") == "https://h/a.jpg"
