"""`listener demo` as the README runs it: embedded Postgres, real photos, the daemon."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from docs_blocks import marked_blocks, normalise, shows
from pydantic import SecretStr
from rich.console import Console

from listener.cli.common import UserError
from listener.cli.demo import (
    BUNDLED_IMAGES,
    DEMO_TABLE,
    Installed,
    _create_table,
    _print_app_row,
    find_images,
    left_behind,
    run_demo,
)
from listener.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
HEALTH_TOKEN = "demo-health-token-" + "Kp3vQ8"  # set: the demo must pass it to /status


_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+) +(?P<message>.*)$")
_VARIES = [
    (re.compile(r"(data directory )\S+"), r"\1DIR"),
    (re.compile(r"complete in \d+\.\ds"), "complete in N.Ns"),
    (re.compile(r"(ai_last_scanned=)\S+\s+\S+,"), r"\1TIMESTAMP,"),
    (re.compile(r'("job_id": )\d+'), r"\1N"),
    (re.compile(r"(photos of vehicle )[0-9a-f]{8}"), r"\1ID"),
]
_METADATA = re.compile(r"ai_scan_metadata=\{.*?\}\}", re.DOTALL)
_VALUE = re.compile(r'("[a-z_]+":\s*)("[^"]*"|[-0-9.]+)')


def comparable(printed: str) -> str:
    """The demo's stdout as ``normalise`` has it, with what varies from run to run replaced:
    the data directory, the timings (the table's ``ms`` column, the total), the time the app's
    row was written and the values of its metadata (which photo finished last), the job ids,
    and the order of the table's rows (the backfill enqueues its photos in no set order)."""
    lines: list[str] = []
    rows: list[str] = []
    for line in printed.splitlines():
        if line.startswith("│"):
            rows.append(re.sub(r"│ *\d+ │$", "│ N │", line.rstrip()))
            continue
        lines.extend(sorted(rows))
        rows = []
        lines.append(line)
    lines.extend(sorted(rows))
    text = "\n".join(lines)
    for pattern, replacement in _VARIES:
        text = pattern.sub(replacement, text)
    # The latest row is the photo that finished last, usually the largest one, not always.
    text = _METADATA.sub(lambda m: _VALUE.sub(r"\1V", m.group(0)), text)
    return normalise(text)


def documented_demo_output() -> tuple[str, list[str]]:
    """The demo's output as docs/getting-started.md shows it: what it prints on stdout, and
    its log lines (stderr), each with the parts that vary by machine and run as ``...``."""
    [block] = marked_blocks("listener demo output")
    printed, logged = [], []
    for line in block.body.splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            printed.append(line)
        else:
            message = re.sub(r"\([^)]*\)|\d+", "...", match.group("message"))
            logged.append(f"{match.group('level')} {message}")
    return "\n".join(printed), logged


def test_demo_on_a_fresh_machine_completes_every_photo(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    # As wide as the output in docs/getting-started.md: no cell of the table is cut.
    env.update({"COLUMNS": "120", "NO_COLOR": "1", "LISTENER_HEALTH_TOKEN": HEALTH_TOKEN})
    result = subprocess.run(
        [sys.executable, "-m", "listener", "demo", "--health-port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr + out
    photos = find_images(BUNDLED_IMAGES)
    assert f"{len(photos)} of {len(photos)} photos complete" in out
    assert "starting an embedded Postgres" in out
    assert "backfill enqueued" in out
    assert re.search(r"/healthz -> 200, /readyz -> 200, /status -> pending 0", out)
    assert HEALTH_TOKEN not in out + result.stderr
    rows = {
        line.split()[1]: line
        for line in out.splitlines()
        if line.startswith("│") and (".png" in line or ".jpg" in line)
    }
    assert len(rows) == len(photos)
    for line in rows.values():
        assert "complete" in line
    astronaut = [c.strip() for c in rows["astronaut.png"].split("│")]
    # image, path, status, size, quality, blur, faces, ...
    assert astronaut[4] == "512x512" and int(astronaut[7]) >= 1
    assert {c.strip() for line in rows.values() for c in line.split("│")[2:3]} == {
        "backfill",
        "trigger",
    }
    # The event stream a live UI would hear: one NOTIFY per finished job.
    assert f"events: {len(photos)} heard on LISTEN listener_events ({len(photos)} complete)" in out
    # No row id on the channel every role may LISTEN to (docs/reference/events.md).
    assert re.search(r'"job_id": [0-9]+, "status": "complete"', out)
    assert '"row_id"' not in out
    # Faces offline: the three photographs of one man are one person, the others no one's.
    assert "person 1: 3 faces in obama_1.jpg, obama_2.jpg, obama_3.jpg" in out
    assert "matched no one else: 2 faces in astronaut.png, biden_1.jpg" in out
    assert "the daemon logs in as listener_daemon" in out
    assert '"table": "listener_demo.vehicle_images"' in out
    # The embedded cluster is stopped and removed afterwards.
    directory = re.search(r"data directory (\S+) \(removed at the end\)", out)
    assert directory is not None and not Path(directory.group(1)).exists()
    # What docs/getting-started.md shows the demo printing is what it prints.
    printed, logged = documented_demo_output()
    assert comparable(out) == comparable(printed)
    for line in logged:
        assert shows(result.stderr, line), f"{line!r} not logged:\n{result.stderr}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_demo_keep_running_stops_its_postgres_on_termination(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """`timeout`, `docker stop` and a closing terminal stop the demo as Ctrl+C does."""
    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    env.update({"COLUMNS": "200", "NO_COLOR": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "listener", "demo", "--health-port", "0", "--keep-running"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "daemon still running" in line:
                break
        out = "".join(lines)
        assert "daemon still running" in out, out + (proc.stderr.read() if proc.stderr else "")
        directory = re.search(r"data directory (\S+) \(removed at the end\)", out)
        assert directory is not None
        data = Path(directory.group(1))
        postmaster = int((data / "data" / "postmaster.pid").read_text().split()[0])
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "demo stopped" in err
    assert not data.exists()
    assert _exits(postmaster, within_s=10), f"postmaster {postmaster} still running"


async def test_app_row_shows_every_step_that_ran(conn: asyncpg.Connection) -> None:
    """A step whose output is all lists and objects (tier 2's parts) shows them by size."""
    await _create_table(conn)
    metadata = {
        "openai.tier1": {"angle": "front", "quality": 8},
        "openai.tier2": {"parts": [{"name": "bumper"}, {"name": "door"}, {"name": "seat"}]},
        "local.analysis": {"width": 512, "blur": {"laplacian_variance": 861.0}},
    }
    await conn.execute(
        f"INSERT INTO {DEMO_TABLE} (vehicle_id, image_url, processing_status, "
        "ai_scan_metadata, ai_last_scanned) "
        "VALUES (gen_random_uuid(), 'http://x/a.png', 'complete', $1::jsonb, now())",
        json.dumps(metadata),
    )
    console = Console(record=True, width=400)
    await _print_app_row(console, conn)
    out = console.export_text()
    assert '"openai.tier2": {"parts": "[3 items]"}' in out, out
    assert '"blur": "{1 key}"' in out and '"quality": 8' in out, out


async def demo_in(dsn: str) -> str:
    """Run the demo in the database ``dsn``; what it printed."""
    console = Console(record=True, width=400)
    await run_demo(Settings(database_url=SecretStr(dsn)), health_port=0, console=console)
    return console.export_text()


def removal_sql(out: str) -> list[str]:
    """The SQL statements the demo's output tells the user to run, in order."""
    return [
        line.strip() for line in out.splitlines() if line.strip().startswith(("DROP", "DELETE"))
    ]


async def test_demo_in_a_new_database_says_what_it_leaves_and_how_to_remove_it(
    pg_admin_dsn: str, dsn_for: Callable[[str], str]
) -> None:
    name = f"demo_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        out = await demo_in(dsn_for(name))
        assert "left in this database (listener_demo was dropped): the schema listener" in out
        # The session's cluster has listener's roles already: they are not the demo's to drop.
        assert "were there before and stay as they were" in out
        assert removal_sql(out) == ["DROP SCHEMA listener CASCADE;"]
        conn = await asyncpg.connect(dsn_for(name))
        try:
            schemas = "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'listener%'"
            assert await conn.fetchval(schemas) == 1  # listener_demo is gone already
            for statement in removal_sql(out):
                await conn.execute(statement)
            assert await conn.fetchval(schemas) == 0
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_demo_where_listener_is_installed_leaves_it_but_for_its_jobs(
    database_url: str, conn: asyncpg.Connection
) -> None:
    out = await demo_in(database_url)
    assert "listener was already installed in this database" in out
    assert "DROP" not in out
    jobs = "SELECT count(*) FROM listener.jobs WHERE source_table = $1"
    assert await conn.fetchval(jobs, DEMO_TABLE) == len(find_images(BUNDLED_IMAGES))
    for statement in removal_sql(out):
        await conn.execute(statement)
    assert await conn.fetchval(jobs, DEMO_TABLE) == 0
    assert await conn.fetchval("SELECT count(*) FROM listener.results") == 0


async def test_demo_leaves_a_listener_demo_schema_it_did_not_make_alone(
    pg_admin_dsn: str, dsn_for: Callable[[str], str]
) -> None:
    """The demo drops its own schema; a user's schema of the same name stops it first, with
    nothing installed and the user's table still there."""
    name = f"demo_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(dsn_for(name))
        try:
            await conn.execute(
                "CREATE SCHEMA listener_demo; CREATE TABLE listener_demo.mine (id int)"
            )
            with pytest.raises(UserError, match="did not make"):
                await demo_in(dsn_for(name))
            assert await conn.fetchval("SELECT to_regclass('listener_demo.mine') IS NOT NULL")
            assert await conn.fetchval("SELECT to_regnamespace('listener') IS NULL")
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def test_roles_the_demo_created_are_dropped_after_the_schema() -> None:
    note = left_behind(Installed(schema=False, roles=frozenset()))
    assert removal_sql(note) == [
        "DROP SCHEMA listener CASCADE;",
        "DROP ROLE listener_worker;",
        "DROP ROLE listener_owner;",
    ]
    assert "cluster-wide" in note


def _exits(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``within_s`` seconds.

    ``pg_ctl stop`` returns once the postmaster removed its pid file, a moment before the
    process itself ends.
    """
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def installed_wheel(tmp_path: Path) -> Path:
    """A venv in ``tmp_path`` with listener installed from a freshly built wheel; its bin/.

    The venv reuses the test venv's installed dependencies through a ``.pth`` line, so the
    install needs no index; only listener itself comes from the wheel (``--no-deps``), and a
    ``.pth`` line adds no ``.pth`` processing of its own, so the test venv's editable install of
    listener is not seen.
    """
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(ROOT), "-w", str(wheels)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    [wheel] = wheels.glob("listener-*.whl")
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    [site] = (venv / "lib").glob("python3*/site-packages")
    deps = [p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()]
    (site / "shared-dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return venv / "bin"


def test_installed_wheel_runs_the_demo_with_cloud_providers_against_the_fakes(
    tmp_path: Path,
) -> None:
    """``pip install`` then ``listener demo --providers openai,rekognition``, outside the checkout.

    The fakes come from the installed package (``listener.testing``), not from the checkout.
    """
    bin_dir = installed_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    env.pop("PYTHONPATH", None)
    env.update({"COLUMNS": "200", "NO_COLOR": "1"})
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "OPENAI_API_KEY"):
        env.pop(key, None)
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import listener.testing; print(listener.__file__)"],
        env=env, cwd=elsewhere, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(bin_dir.parent), where.stdout
    result = subprocess.run(
        [str(bin_dir / "listener"), "demo", "--health-port", "0",
         "--providers", "openai,rekognition"],
        env=env, cwd=elsewhere, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, result.stderr + out
    photos = len(find_images(BUNDLED_IMAGES)) + 2  # plus two portraits for the faces step
    assert f"{photos} of {photos} photos complete" in out
    assert (
        "tiered pipeline: local.analysis, rekognition.labels, openai.tier1, rekognition.faces, "
        "openai.tier2, openai.tier3" in out
    )
    rows = [line for line in out.splitlines() if "astronaut.png" in line]
    cloud = [c.strip() for c in rows[0].split("│")]
    # image, labels, angle, quality, tiers, faces, USD
    assert "Face" in cloud[2] and cloud[3] and cloud[5].startswith("1")
    assert "person 1" in cloud[6] and float(cloud[7]) > 0
    assert re.search(r"batches: [1-9]\d* through OpenAI's Batch API", out)
    people = re.search(r"faces: (\d+) indexed, (\d+) person", out)
    assert people is not None and int(people.group(1)) >= 3 and int(people.group(2)) >= 1
