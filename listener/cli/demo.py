"""``listener demo``: the whole pipeline on real photographs, on a fresh machine.

It starts an embedded Postgres unless a database URL is set, migrates, creates a table shaped
like the original app's (``vehicle_images``), inserts half the photos *before* attaching (the
rows the app never had analyzed: the backfill path), attaches, backfills, starts the daemon,
inserts the other half one row per transaction (the trigger path), waits until every job is
finished, prints what the local provider found, what the health endpoint says, the app's row
as listener wrote it back and the terminal events a LISTENer heard, and cleans up. With a
database URL it works in a schema of its own, ``listener_demo``, dropped at the end; the
``listener`` schema (and the roles) that migrating installed there stay, and the demo ends by
saying what stayed and the SQL that removes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from aiohttp import web
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from listener.app import Daemon
from listener.app_side.backfill import enqueue_backfill
from listener.cli.common import UserError
from listener.cli.render import shown
from listener.db.migrate import migrate
from listener.db.queries import Queries
from listener.settings import Settings, TierSettings
from listener.testing.cluster import TemporaryCluster
from listener.testing.rekognition_fake import face_photo

DEMO_SCHEMA = "listener_demo"
DEMO_TABLE = f"{DEMO_SCHEMA}.vehicle_images"
DEMO_MARK = "made by listener demo, dropped when it ends"
"""The comment on ``DEMO_SCHEMA``: a schema of that name without it is not the demo's."""
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
BUNDLED_IMAGES = Path(__file__).resolve().parents[1] / "demo_images"
"""Public-domain / CC0 photographs from scikit-image's sample data (NASA, SpaceX, CC0 authors)."""


PROVIDERS = ("openai", "rekognition")
"""Cloud providers the demo can run against local fakes of their APIs."""


async def start_fake(name: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start the fake of provider ``name`` (``python -m listener.testing.<name>_fake``).

    Returns the process and the URL it printed on its ``READY <url>`` line.

    Raises:
        RuntimeError: it exited or did not announce itself within 60 seconds.
    """
    module = f"listener.testing.{name}_fake"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while line := await proc.stdout.readline():
                text = line.decode().strip()
                if text.startswith("READY "):
                    return proc, text.split(" ", 1)[1]
    except TimeoutError:
        pass
    proc.kill()
    raise RuntimeError(f"{module} did not start")


def provider_settings(
    settings: Settings, providers: list[str], openai_url: str | None, rekognition_url: str | None
) -> Settings:
    """``settings`` with the tiered pipeline over local + the given providers, on the fakes."""
    tier1 = ["local", *[p for p in ("rekognition", "openai") if p in providers]]
    paid_tiers = ["openai"] if "openai" in providers else []
    update: dict[str, Any] = {
        # The backfilled photos take the Batch API path; batches are checked twice a second
        # and submitted after a second's wait, so the demo shows it in seconds, not hours.
        "batch": settings.batch.model_copy(update={"poll_interval_s": 0.5, "max_wait_s": 1.0}),
        "pipeline": "tiered",
        "tiers": TierSettings(
            tier1=tier1,
            tier2=paid_tiers,
            tier3=paid_tiers,
            tier2_min_quality=6.0,
            tier3_min_side=512,
            faces="rekognition" in providers,
        ),
    }
    if openai_url is not None:
        update["openai"] = settings.openai.model_copy(
            update={
                "api_key": SecretStr("sk-demo-fake-server"),
                "base_url": openai_url,
                "image_transport": "inline",
            }
        )
    if rekognition_url is not None:
        update["rekognition"] = settings.rekognition.model_copy(
            update={"endpoint_url": rekognition_url, "region": "us-east-1"}
        )
    return settings.model_copy(update=update)


def find_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, by name.

    Raises:
        ValueError: the folder does not exist or holds no images.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return found


async def serve_folder(folder: Path) -> tuple[web.AppRunner, str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 and a free port; returns (runner, base URL)."""
    app = web.Application()
    app.router.add_static("/", folder)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, f"http://127.0.0.1:{port}"


async def _refuse_foreign_schema(conn: asyncpg.Connection) -> None:
    """Stop before anything is installed when ``DEMO_SCHEMA`` exists and is not the demo's
    (a schema of the user's that happens to have that name: the demo drops its own).

    Raises:
        UserError: the schema exists without ``DEMO_MARK``.
    """
    comment = await conn.fetchrow(
        "SELECT pg_catalog.obj_description(oid, 'pg_namespace') AS mark "
        "FROM pg_catalog.pg_namespace WHERE nspname = $1",
        DEMO_SCHEMA,
    )
    if comment is not None and comment["mark"] != DEMO_MARK:
        raise UserError(
            f"this database has a schema {DEMO_SCHEMA} that listener demo did not make; the "
            "demo drops its own schema when it ends, so it stops here and changes nothing "
            "(rename that schema, or point DATABASE_URL at another database)"
        )


async def _create_table(conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"""
        DROP SCHEMA IF EXISTS {DEMO_SCHEMA} CASCADE;
        CREATE SCHEMA {DEMO_SCHEMA};
        COMMENT ON SCHEMA {DEMO_SCHEMA} IS '{DEMO_MARK}';
        CREATE TABLE {DEMO_TABLE} (
            id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            vehicle_id        uuid NOT NULL,
            image_url         text,
            processing_status text,
            ai_scan_metadata  jsonb,
            processing_error  text,
            ai_last_scanned   timestamptz,
            created_at        timestamptz NOT NULL DEFAULT now()
        );
        """
    )


def _as_role(dsn: str, role: str) -> str:
    """``dsn`` (a ``postgresql://`` URL without a password) logged in as ``role``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))


async def _insert(conn: asyncpg.Connection, vehicle_id: uuid.UUID, url: str) -> None:
    await conn.execute(
        f"INSERT INTO {DEMO_TABLE} (vehicle_id, image_url) VALUES ($1, $2)", vehicle_id, url
    )


def _port_free(port: int) -> bool:
    import socket

    if port == 0:
        return True
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


async def run_demo(
    settings: Settings,
    *,
    images: Path | None = None,
    health_port: int = 8080,
    keep_running: bool = False,
    console: Console | None = None,
    timeout_s: float = 120.0,
    providers: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the demo and print its report.

    Args:
        settings: base settings; the database URL, if any, is used instead of an embedded
            Postgres.
        images: a folder of photos; default: the bundled ones.
        health_port: the health server's port; 0 or a taken port picks a free one.
        keep_running: keep the daemon up after the report until Ctrl+C.
        console: where to print.
        timeout_s: give up waiting for the jobs after this many seconds.
        providers: cloud providers (``openai``, ``rekognition``) to add to the local one,
            served by local fakes of their APIs: the tiered pipeline without credentials.

    Returns:
        One dict per image: the job's fields and the local provider's output.

    Raises:
        ValueError: the image folder is missing or empty.
        TimeoutError: the jobs did not finish in ``timeout_s``.
        listener.db.cluster.ClusterError: no database URL and no Postgres could be started.
    """
    console = console or Console()
    providers = providers or []
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise ValueError(
            f"unknown provider(s) {', '.join(sorted(unknown))}; choose from {PROVIDERS}"
        )
    photos = find_images(images or BUNDLED_IMAGES)
    if not providers and settings.pipeline == "local":
        # Faces offline: the local pipeline's faces step (dlib embeddings in Postgres).
        settings = settings.model_copy(
            update={"tiers": settings.tiers.model_copy(update={"faces": True})}
        )
    started = time.perf_counter()
    fakes: list[asyncio.subprocess.Process] = []
    extra = None
    if providers:
        urls: dict[str, str] = {}
        for name in providers:
            proc, url = await start_fake(name)
            fakes.append(proc)
            urls[name] = url
        console.print(
            f"[bold]0.[/bold] started local fakes of {', '.join(providers)}: "
            + ", ".join(f"{k} at {v}" for k, v in urls.items())
        )
        if "rekognition" in providers:
            for var, value in (
                ("AWS_ACCESS_KEY_ID", "demo"),
                ("AWS_SECRET_ACCESS_KEY", "demo"),
                ("AWS_DEFAULT_REGION", "us-east-1"),
            ):
                os.environ.setdefault(var, value)
            # Two more photos of the astronaut, so the faces step has someone to recognise.
            extra = Path(tempfile.mkdtemp(prefix="listener-demo-"))
            for photo in photos:
                shutil.copy(photo, extra / photo.name)
            (extra / "portrait_1.jpg").write_bytes(face_photo("a", seed=11))
            (extra / "portrait_2.jpg").write_bytes(face_photo("a", seed=12, scale=1.2))
            photos = find_images(extra)
        settings = provider_settings(
            settings, providers, urls.get("openai"), urls.get("rekognition")
        )
    cluster: TemporaryCluster | None = None
    if settings.database_url is None:
        console.print("[bold]1.[/bold] starting an embedded Postgres (no database URL set)")
        cluster = TemporaryCluster()
        dsn = await asyncio.to_thread(cluster.start)
        console.print(f"   data directory {shown(cluster.directory)} (removed at the end)")
    else:
        console.print("[bold]1.[/bold] using the database from the database URL")
        dsn = settings.dsn()
    runner, base_url = await serve_folder(photos[0].parent)
    conn: asyncpg.Connection | None = None
    events = EventStream(console)
    # With a database URL, what listener installs there stays; the end of the demo says what.
    found: Installed | None = None
    migrated = made_table = False
    try:
        conn = await asyncpg.connect(dsn)
        if cluster is None:
            await _refuse_foreign_schema(conn)
            found = await _installed(conn)
        applied = await migrate(conn)
        migrated = True
        console.print(f"[bold]2.[/bold] migrated: {', '.join(applied) or 'already up to date'}")
        await events.listen(dsn)
        await _create_table(conn)
        made_table = True
        # One vehicle (one owner, one collection of faces) so that its photos can match.
        vehicles = [uuid.uuid4()]
        half = len(photos) // 2
        before, after = photos[:half], photos[half:]
        for i, photo in enumerate(before):
            await _insert(conn, vehicles[i % len(vehicles)], f"{base_url}/{photo.name}")
        console.print(
            f"[bold]3.[/bold] created {DEMO_TABLE}; inserted {len(before)} photos "
            "before attaching (never analyzed, like the original app's rows)"
        )
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            queries = Queries(pool)
            await queries.attach(
                DEMO_TABLE,
                "id",
                "image_url",
                "vehicle_id",
                "processing_status",
                result_column="ai_scan_metadata",
                error_column="processing_error",
                analyzed_at_column="ai_last_scanned",
            )
            report = await enqueue_backfill(
                queries, DEMO_TABLE, priority=settings.backfill_priority
            )
            console.print(
                f"[bold]4.[/bold] attached the triggers; backfill enqueued {report.enqueued} jobs"
            )
            daemon_dsn = dsn
            if cluster is not None:
                # The daemon's own role, as the README sets one up (Security in the
                # database): in listener_worker, no superuser.
                await conn.execute(
                    "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
                    "'listener_daemon') THEN CREATE ROLE listener_daemon LOGIN IN ROLE "
                    "listener_worker; END IF; END $$"
                )
                daemon_dsn = _as_role(dsn, "listener_daemon")
                console.print(
                    "   the daemon logs in as listener_daemon (a member of listener_worker; "
                    "not a superuser)"
                )
            port = health_port if _port_free(health_port) else 0
            fetch = settings.fetch.model_copy(
                update={"allowed_hosts": [*settings.fetch.allowed_hosts, "127.0.0.1"]}
            )
            daemon_settings = settings.model_copy(
                update={
                    "database_url": SecretStr(daemon_dsn),
                    "listen_database_url": None,
                    "health_port": port,
                    "fetch": fetch,
                    "poll_interval_s": min(settings.poll_interval_s, 1.0),
                }
            )
            async with Daemon(daemon_settings) as daemon:
                assert daemon.health is not None
                console.print(
                    f"[bold]5.[/bold] daemon running ({daemon_settings.pipeline} pipeline: "
                    f"{', '.join(step.name for step in daemon.plan.steps)}; "
                    f"health on {daemon.health.url}); inserting {len(after)} more photos, "
                    "one per transaction"
                )
                for i, photo in enumerate(after):
                    await _insert(conn, vehicles[i % len(vehicles)], f"{base_url}/{photo.name}")
                await _wait_finished(queries, timeout_s)
                health = await _read_health(daemon.health.url, daemon_settings.health_token_value())
                rows = await queries.table_jobs(DEMO_TABLE, "local.analysis")
                if daemon.status_writeback is not None:
                    # The app's status column is written back outside the claim, a moment
                    # after the job changes: sweep until the outbox is empty (the daemon's
                    # own sweep may hold a row for a moment) so the table below is current.
                    for _ in range(100):
                        await daemon.status_writeback.tick()
                        if not await queries.status_outbox_waiting():
                            break
                        await asyncio.sleep(0.05)
                statuses = {
                    str(r["id"]): r["processing_status"]
                    for r in await conn.fetch(f"SELECT id, processing_status FROM {DEMO_TABLE}")
                }
                for row in rows:
                    row["processing_status"] = statuses.get(row["source_id"])
                    row["path"] = (
                        "backfill"
                        if row["image_url"].rsplit("/", 1)[-1] in {p.name for p in before}
                        else "trigger"
                    )
                if providers:
                    await _print_provider_report(console, conn, rows)
                _print_report(console, rows, health, time.perf_counter() - started)
                await _print_people(console, conn)
                await _print_app_row(console, conn)
                events.print_summary()
                if keep_running:
                    console.print(
                        "daemon still running; insert rows into "
                        f"{DEMO_TABLE} to see their events here; Ctrl+C to stop"
                    )
                    events.live = True
                    await daemon.wait()
        finally:
            await pool.close()
        return rows
    finally:
        await events.close()
        if conn is not None:
            if cluster is None and made_table:
                await conn.execute(f"SELECT listener.detach('{DEMO_TABLE}')")
                await conn.execute(f"DROP SCHEMA IF EXISTS {DEMO_SCHEMA} CASCADE")
            await conn.close()
        if found is not None and migrated:
            console.print(left_behind(found), markup=False, highlight=False)
        await runner.cleanup()
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
        for proc in fakes:
            proc.terminate()
            await proc.wait()
        if extra is not None:
            shutil.rmtree(extra, ignore_errors=True)


ROLES = ("listener_owner", "listener_worker")
"""The roles ``listener migrate`` creates when they are missing (cluster-wide)."""


@dataclass(frozen=True, slots=True)
class Installed:
    """What of listener a database held before the demo migrated it: whether its
    ``listener`` schema existed, and which of ``ROLES`` did."""

    schema: bool
    roles: frozenset[str]


async def _installed(conn: asyncpg.Connection) -> Installed:
    schema = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'listener')"
    )
    roles = await conn.fetch(
        "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[])",
        list(ROLES),
    )
    return Installed(bool(schema), frozenset(r["rolname"] for r in roles))


def left_behind(before: Installed) -> str:
    """What a demo run against a database URL leaves in that database, and the SQL that
    removes it; nothing is removed for the user. ``before``: what was there before the demo
    migrated it (its own schema, ``listener_demo``, is always dropped)."""
    if before.schema:
        return (
            "listener was already installed in this database: the demo left its schema as it "
            f"was (migrated as step 2 says), apart from the demo's jobs and their results "
            f"(source_table '{DEMO_TABLE}'); to remove those:\n"
            f"  DELETE FROM listener.jobs WHERE source_table = '{DEMO_TABLE}';"
        )
    created = [r for r in ROLES if r not in before.roles]
    kept = [r for r in ROLES if r in before.roles]
    text = (
        f"left in this database ({DEMO_SCHEMA} was dropped): the schema listener, which "
        "'listener migrate' installed (its tables, functions, and the demo's jobs and results)"
    )
    if created:
        text += (
            f", and the roles {', '.join(created)} (cluster-wide: drop them only if no other "
            "database of this server uses listener)"
        )
    if kept:
        text += f"; the roles {', '.join(kept)} were there before and stay as they were"
    text += ". To remove what the demo installed:\n  DROP SCHEMA listener CASCADE;"
    for role in reversed(created):
        text += f"\n  DROP ROLE {role};"
    return text


async def _wait_finished(queries: Queries, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            counts = await queries.queue_counts()
            if counts.pending == 0 and counts.processing == 0 and counts.batched == 0:
                return
            await asyncio.sleep(0.1)


async def _read_health(base_url: str, token: str | None) -> dict[str, Any]:
    """``/healthz`` and ``/readyz`` statuses and the ``/status`` document (with the token)."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/healthz") as resp:
            healthz = resp.status
        async with session.get(f"{base_url}/readyz") as resp:
            readyz = resp.status
        async with session.get(f"{base_url}/status", headers=auth) as resp:
            status: dict[str, Any] = await resp.json()
    return {"url": base_url, "healthz": healthz, "readyz": readyz, "status": status}


def _print_report(
    console: Console, rows: list[dict[str, Any]], health: dict[str, Any], seconds: float
) -> None:
    table = Table(title="listener demo: every photo, analyzed by the local provider")
    for name in ("image", "path", "status"):
        table.add_column(name)
    for name in ("size", "quality", "blur", "faces"):
        table.add_column(name, justify="right")
    table.add_column("phash")
    table.add_column("ms", justify="right")
    for row in rows:
        out = row["output"] or {}
        name = row["image_url"].rsplit("/", 1)[-1]
        status = row["processing_status"] or row["status"]
        if row["status"] == "failed":
            status = f"failed: {row['last_error']}"
        table.add_row(
            shown(name),
            shown(row["path"]),
            shown(status),
            f"{out['width']}x{out['height']}" if out else "",
            f"{out['quality']:.1f}" if out else "",
            f"{out['blur']['laplacian_variance']:.0f}" if out else "",
            str(out["faces"]["count"]) if out else "",
            out.get("phash", ""),
            f"{row['duration_ms']:.0f}" if row["duration_ms"] is not None else "",
        )
    console.print(table)
    status = health["status"]
    console.print(
        f"health: {health['url']}/healthz -> {health['healthz']}, /readyz -> {health['readyz']}, "
        f"/status -> pending {status['pending']}, processing {status['processing']}, "
        f"complete {status['complete']}, failed {status['failed']}"
    )
    complete = sum(1 for r in rows if r["status"] == "complete")
    console.print(f"[bold]{complete} of {len(rows)} photos complete in {seconds:.1f}s[/bold]")


def metadata_brief(metadata: Any) -> Any:
    """A result column's object in one line: each step's output with its scalars as they are
    and its lists and objects by size (``"[4 items]"``, ``"{2 keys}"``), so that a step whose
    output is all nested (tier 2's ``parts``) shows what it holds, not ``{}``."""

    def size(value: Any) -> Any:
        if isinstance(value, list):
            return f"[{len(value)} item{'' if len(value) == 1 else 's'}]"
        if isinstance(value, dict):
            return f"{{{len(value)} key{'' if len(value) == 1 else 's'}}}"
        return value

    if not isinstance(metadata, dict):
        return size(metadata)
    return {
        step: {k: size(v) for k, v in out.items()} if isinstance(out, dict) else size(out)
        for step, out in metadata.items()
    }


async def _print_people(console: Console, conn: asyncpg.Connection) -> None:
    """The people the faces step found, per owner: each person's photos, then the faces that
    matched no one (``listener.faces``)."""
    rows = await conn.fetch(
        f"SELECT f.owner_id, f.person_id, t.image_url FROM listener.faces AS f "
        f"JOIN {DEMO_TABLE} AS t ON t.id::text = f.source_id "
        "ORDER BY f.owner_id, f.person_id NULLS LAST, t.image_url"
    )
    if not rows:
        return
    owners: dict[str, dict[int | None, list[str]]] = {}
    for r in rows:
        name = r["image_url"].rsplit("/", 1)[-1]
        owners.setdefault(r["owner_id"], {}).setdefault(r["person_id"], []).append(name)
    for owner, people in owners.items():
        persons = [names for person, names in people.items() if person is not None]
        console.print(
            f"people found in the photos of vehicle {shown(str(owner)[:8])}: {len(persons)}",
            highlight=False,
        )
        for number, names in enumerate(persons, 1):
            console.print(
                f"  person {number}: {len(names)} faces in {', '.join(map(shown, names))}",
                highlight=False,
            )
        alone = people.get(None, [])
        if alone:
            console.print(
                f"  matched no one else: {len(alone)} faces in {', '.join(map(shown, alone))}",
                highlight=False,
            )


async def _print_app_row(console: Console, conn: asyncpg.Connection) -> None:
    """One row of the app's table as the app reads it: the columns listener wrote back."""
    row = await conn.fetchrow(
        f"SELECT processing_status, processing_error, ai_last_scanned, ai_scan_metadata "
        f"FROM {DEMO_TABLE} WHERE ai_scan_metadata IS NOT NULL "
        "ORDER BY ai_last_scanned DESC LIMIT 1"
    )
    if row is None:
        return
    brief = metadata_brief(json.loads(row["ai_scan_metadata"]))
    # No file name in this line: the demo's test reads the photo rows by their names.
    console.print(
        f"the latest row of {DEMO_TABLE} as the app reads it (written back by listener): "
        "processing_status="
        f"{row['processing_status']}, processing_error={row['processing_error']}, "
        f"ai_last_scanned={row['ai_last_scanned']:%Y-%m-%d %H:%M:%S%z},\n"
        f"  ai_scan_metadata={json.dumps(brief, sort_keys=True)} (nested values by size)",
        markup=False,
        highlight=False,
    )


class EventStream:
    """What an app's live UI hears: ``LISTEN listener_events`` on a connection of its own.

    Each terminal change of a job (complete, failed, cancelled) arrives as one NOTIFY whose
    payload is ``{"table", "status", "job_id"}`` (migrations 0010, 0020: no row id, since any
    role may LISTEN), after the change committed. The demo keeps them in ``received`` and
    prints a summary; with ``live`` set it prints each one as it arrives.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.received: list[dict[str, Any]] = []
        self.live = False
        self._conn: asyncpg.Connection | None = None

    async def listen(self, dsn: str) -> None:
        """Open the connection and ``LISTEN listener_events`` on it.

        Raises:
            OSError, asyncpg.PostgresError: the database cannot be reached.
        """
        self._conn = await asyncpg.connect(dsn)
        await self._conn.add_listener("listener_events", self._on_event)

    def _on_event(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        event = json.loads(payload)
        self.received.append(event)
        if self.live:
            self.console.print(f"event: {json.dumps(event)}", markup=False, highlight=False)

    def print_summary(self, shown_at_most: int = 3) -> None:
        """The count per status and the first ``shown_at_most`` payloads, as received."""
        counts: dict[str, int] = {}
        for event in self.received:
            counts[str(event.get("status"))] = counts.get(str(event.get("status")), 0) + 1
        per_status = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        self.console.print(
            f"events: {len(self.received)} heard on LISTEN listener_events "
            f"({per_status or 'none'}), one per finished job, for live UIs; the first:"
        )
        for event in self.received[:shown_at_most]:
            self.console.print(f"  {json.dumps(event)}", markup=False, highlight=False)

    async def close(self) -> None:
        """Close the connection; safe when ``listen`` never ran or failed."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


async def _print_provider_report(
    console: Console, conn: asyncpg.Connection, rows: list[dict[str, Any]]
) -> None:
    """What the cloud steps found: labels, angle, quality, tiers, faces and people, cost."""
    results: dict[int, dict[str, Any]] = {}
    for r in await conn.fetch(
        "SELECT job_id, step, output, cost_usd FROM listener.results WHERE step <> $1",
        "local.analysis",
    ):
        entry = results.setdefault(r["job_id"], {"cost": 0.0, "steps": {}})
        entry["steps"][r["step"]] = json.loads(r["output"])
        entry["cost"] += float(r["cost_usd"])
    people = {
        r["face_id"]: r["person_id"]
        for r in await conn.fetch("SELECT face_id, person_id FROM listener.faces")
    }
    table = Table(title="tiered pipeline: Rekognition and OpenAI steps (local fakes)")
    for name in ("image", "labels", "angle", "quality", "tiers", "faces", "USD"):
        table.add_column(name, justify="right" if name in ("quality", "USD") else "left")
    total = 0.0
    for row in rows:
        entry = results.get(row["id"], {"cost": 0.0, "steps": {}})
        steps = entry["steps"]
        labels = steps.get("rekognition.labels", {}).get("labels", [])
        tier1 = steps.get("openai.tier1", {})
        tiers = sorted({int(k[-1]) for k in steps if k.startswith("openai.tier")})
        faces = steps.get("rekognition.faces", {}).get("faces", [])
        face_text = ", ".join(
            f"{f['decision']}"
            + (f" -> person {people.get(f['face_id'])}" if people.get(f["face_id"]) else "")
            for f in faces
        )
        total += entry["cost"]
        table.add_row(
            shown(row["image_url"].rsplit("/", 1)[-1]),
            shown(", ".join(label["name"] for label in labels[:3])),
            str(tier1.get("angle", "")),
            str(tier1.get("quality", "")),
            ",".join(map(str, tiers)),
            shown(face_text) or ("none" if "rekognition.faces" in steps else ""),
            f"{entry['cost']:.4f}",
        )
    console.print(table)
    persons = len({p for p in people.values() if p is not None})
    batches = await conn.fetch("SELECT step, requests, status FROM listener.batches")
    console.print(
        f"faces: {len(people)} indexed, {persons} person(s) recognised across photos; "
        f"spend recorded: ${total:.4f} (at list prices; the fakes charge nothing)\n"
        f"batches: {len(batches)} through OpenAI's Batch API at half price ("
        + ", ".join(f"{b['step']}: {b['requests']} {b['status']}" for b in batches)
        + "), for the backfilled photos; the others went realtime"
    )
