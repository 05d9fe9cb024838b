"""The status page: rendered from a running daemon's status and loaded in a real headless Chromium.

The browser test serves the page through the health server's real ``GET /`` route when
``build_app`` has one, else through a small handler here that does what that route does
(``render(await status_document(sources))``). Chromium's dumped DOM is compared with
``listener status --json`` run at the same moment, with the provider holding its jobs so the
counts cannot move between the readings; a screenshot is saved to
``tests/artifacts/status_page.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from awaiting import jobs_finished, when
from support import (
    GatedProvider,
    cli,
    counts,
    fast_settings,
    make_table,
    wait_until,
)

from listener.app import Daemon
from listener.errors import InvalidImage, ListenerError
from listener.ops.health import SOURCES, HealthSources, build_app, status_document
from listener.ops.status_page import STATUSES, render

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
HOSTILE_ERROR = 'not an image: <script>alert("owned")</script> looks like HTML'
TRUNCATED_ERROR = "truncated PNG & \"quoted\" 'data' <eof>"
HOSTILE_OWNER = "<b>eve</b> & co"
PAUSE_REASON = "OpenAI: insufficient_quota <check billing & plan>"
CONCURRENCY = 4


# --- a small DOM reader ------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One element of the parsed page: its tag, attributes, parent and text (descendants')."""

    tag: str
    attrs: dict[str, str]
    parent: Node | None
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts).strip()

    def within(self, ancestor: Node) -> bool:
        node = self.parent
        while node is not None:
            if node is ancestor:
                return True
            node = node.parent
        return False


class Dom(HTMLParser):
    """Every element of an HTML document, in order; attribute values and text unescaped."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.nodes: list[Node] = []
        self._open: list[Node] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self._open[-1] if self._open else None)
        self.nodes.append(node)
        if tag not in self.VOID:
            self._open.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        parent = self._open[-1] if self._open else None
        self.nodes.append(Node(tag, {k: v or "" for k, v in attrs}, parent))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i].tag == tag:
                del self._open[i:]
                return

    def handle_data(self, data: str) -> None:
        for node in self._open:
            node.parts.append(data)

    def by_id(self, ident: str) -> Node:
        found = [n for n in self.nodes if n.attrs.get("id") == ident]
        assert len(found) == 1, f"expected one #{ident}, found {len(found)}"
        return found[0]

    def has_id(self, ident: str) -> bool:
        return any(n.attrs.get("id") == ident for n in self.nodes)

    def find(
        self, tag: str | None = None, *, within: Node | None = None, **attrs: str
    ) -> list[Node]:
        """Elements with ``tag`` (any if None) having ``attrs`` (``http_equiv``: ``http-equiv``)."""
        wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [
            n
            for n in self.nodes
            if (tag is None or n.tag == tag)
            and (within is None or n.within(within))
            and all(n.attrs.get(k) == v for k, v in wanted.items())
        ]

    def rows_with(self, table_id: str, attr: str) -> list[Node]:
        return [n for n in self.find("tr", within=self.by_id(table_id)) if attr in n.attrs]

    def cells(self, row: Node) -> dict[str, int]:
        """``{data-status: int(data-value)}`` of a row's count cells."""
        return {
            n.attrs["data-status"]: int(n.attrs["data-value"])
            for n in self.nodes
            if n.parent is row and "data-status" in n.attrs
        }


# --- render alone ------------------------------------------------------------------------


def test_render_survives_an_empty_document() -> None:
    dom = Dom(render({}))
    assert dom.find("title")[0].text == "listener status"
    assert all(dom.by_id(f"count-{s}").attrs["data-value"] == "0" for s in STATUSES)
    assert dom.by_id("eta").attrs["data-value"] == ""
    assert dom.by_id("budget").attrs["data-value"] == ""
    assert dom.by_id("budget-exhausted").attrs["data-value"] == "false"
    for section in (
        "by-table",
        "by-owner",
        "open-batches",
        "failure-reasons",
        "recent-failures",
        "face-review",
        "outboxes",
    ):
        assert dom.by_id(f"{section}-none").text == "none"
    assert dom.by_id("face-suggestions-open").attrs["data-value"] == "0"
    assert len(dom.find("g", class_="minute")) == 60
    assert not dom.find("link") and not dom.find("script") and not dom.find("img")


def test_render_escapes_every_user_string() -> None:
    evil = '"><script>alert(1)</script><b x="'
    doc: dict[str, Any] = {
        "pending": 2,
        "by_table": [{"table": evil, "pending": 2}],
        "by_owner": [{"table": evil, "owner": evil, "pending": 2}],
        "open_batches": [{"id": evil, "provider": evil, "status": evil, "created_at": evil}],
        "failure_reasons": [{"reason": evil, "count": 1}],
        "recent_failures": [
            {
                "job_id": evil,
                "table": evil,
                "source_id": evil,
                "url": evil,
                "error": evil,
                "at": evil,
            }
        ],
        "paused_providers": {evil: {"remaining_s": 3, "reason": evil}},
        "face_suggestions_open": 3,
        "face_suggestions_by_owner": [{"owner": evil, "suggestions": 2}, {"owner": None}],
        "worker_id": evil,
        "providers": [evil],
        "outboxes": {
            evil: {"table": evil, "depth": 3, "depth_exact": True, "oldest_age_s": 1.5},
            "status": {"table": "t", "depth": 20000, "depth_exact": False, "oldest_age_s": 90},
        },
    }
    page = render(doc)
    assert "<script" not in page and "<b x" not in page
    dom = Dom(page)
    assert not dom.find("script") and not dom.find("b", x="")
    assert dom.rows_with("by-table", "data-table")[0].attrs["data-table"] == evil
    assert dom.rows_with("by-owner", "data-owner")[0].attrs["data-owner"] == evil
    assert dom.rows_with("open-batches", "data-batch-id")[0].attrs["data-batch-id"] == evil
    assert dom.rows_with("failure-reasons", "data-reason")[0].attrs["data-reason"] == evil
    failure = dom.rows_with("recent-failures", "data-job-id")[0]
    assert failure.attrs["data-job-id"] == evil
    assert dom.find("td", class_="error", within=failure)[0].text == evil
    assert dom.rows_with("paused-providers", "data-provider")[0].attrs["data-provider"] == evil
    assert dom.by_id("daemon").attrs["data-worker-id"] == evil
    review = dom.rows_with("face-review", "data-owner")
    assert [(r.attrs["data-owner"], r.attrs["data-suggestions"]) for r in review] == [
        (evil, "2"),
        ("", "0"),
    ]
    assert dom.by_id("face-suggestions-open").attrs["data-value"] == "3"
    outboxes = dom.rows_with("outboxes", "data-outbox")
    assert [
        (r.attrs["data-outbox"], r.attrs["data-depth"], r.attrs["data-depth-exact"])
        for r in outboxes
    ] == [(evil, "3", "true"), ("status", "20000", "false")]
    assert outboxes[1].attrs["data-oldest-age-s"] == "90"
    assert "~20,000" in outboxes[1].text and "1m 30s" in outboxes[1].text


def test_throughput_has_one_bar_per_minute_of_the_last_hour() -> None:
    now = datetime(2025, 3, 1, 12, 30, 20, tzinfo=UTC)
    doc = {
        "throughput_per_minute": [
            {"minute": "2025-03-01T11:00:00+00:00", "complete": 99, "failed": 0},  # too old
            {"minute": "2025-03-01T11:31:00+00:00", "complete": 4, "failed": 1},
            {"minute": "2025-03-01T14:29:00+02:00", "complete": 7, "failed": 0},
            {"minute": "2025-03-01T12:30:00Z", "complete": 0, "failed": 2},
        ],
        "rate_per_s": 0.25,
        "eta_s": None,
    }
    dom = Dom(render(doc, now=now, refresh_s=0))
    minutes = dom.find("g", class_="minute")
    assert len(minutes) == 60
    assert minutes[0].attrs["data-minute"] == "2025-03-01T11:31:00+00:00"
    bars = {
        m.attrs["data-minute"][11:16]: (int(m.attrs["data-complete"]), int(m.attrs["data-failed"]))
        for m in minutes
        if m.attrs["data-complete"] != "0" or m.attrs["data-failed"] != "0"
    }
    assert bars == {"11:31": (4, 1), "12:29": (7, 0), "12:30": (0, 2)}
    rects = dom.find("rect", within=dom.by_id("throughput"))
    assert len(rects) == 4
    assert all(len(dom.find("title", within=r)) == 1 for r in rects)
    assert dom.find("title", within=rects[0])[0].text == "11:31 UTC: 4 complete"
    assert dom.by_id("throughput-complete").attrs["data-value"] == "11"
    assert dom.by_id("throughput-failed").attrs["data-value"] == "3"
    assert not dom.find("meta", http_equiv="refresh")


# --- the page of a running daemon, in Chromium ---------------------------------------------


def chromium_binary() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


async def chromium(binary: str, profile: Path, *args: str, timeout: float = 60.0) -> str:
    """Run headless Chromium with ``args``; its stdout.

    It runs in a session of its own so that, on a timeout, its helper processes die with it.
    """
    proc = await asyncio.create_subprocess_exec(
        binary,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode()


def status_json(env: dict[str, str]) -> dict[str, Any]:
    """``listener status --json`` as a user runs it."""
    result = cli(env, "status", "--json", ok=True)
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def serves_page(app: web.Application) -> bool:
    """True when the health app already has the status page at ``GET /``."""
    return any(
        resource.canonical == "/" and any(route.method in ("GET", "*") for route in resource)
        for resource in app.router.resources()
    )


async def page(request: web.Request) -> web.Response:
    """What the health server's ``GET /`` does (used until that route exists)."""
    doc = await status_document(request.app[SOURCES])
    return web.Response(text=render(doc), content_type="text/html", charset="utf-8")


async def settled(conn: asyncpg.Connection) -> bool:
    """True when the job counts did not change over a third of a second."""
    first = await counts(conn)
    await asyncio.sleep(0.35)
    return await counts(conn) == first


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails if ``data`` is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


async def test_status_page_in_chromium_matches_status_json(
    database_url: str,
    conn: asyncpg.Connection,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
) -> None:
    browser = chromium_binary()
    if browser is None:
        pytest.skip(f"no Chromium binary ({', '.join(CHROMIUM_NAMES)}) on PATH")
    env = {**env_for_subprocess, "LISTENER_BUDGET_USD_PER_DAY": "2.5"}
    table = await make_table(conn, "photos", owner=True, status=True)
    await conn.execute(
        f"INSERT INTO {table} (url, owner_id) SELECT 'https://img.example/' || g || '.jpg', "
        "($1::text[])[g % 3 + 1] FROM generate_series(1, 50) g",
        ["alice", "bob", HOSTILE_OWNER],
    )
    failures: dict[str, list[ListenerError]] = {
        **{key: [InvalidImage(HOSTILE_ERROR)] for key in ("3", "7", "11")},
        **{key: [InvalidImage(TRUNCATED_ERROR)] for key in ("15", "19")},
    }
    provider = GatedProvider(delay_s=0.05, failures=failures)
    settings = fast_settings(
        database_url, concurrency=CONCURRENCY, prefetch=2, budget_usd_per_day=2.5
    )

    async def progressed() -> bool:
        c = await counts(conn)
        return c.get("failed", 0) == 5 and c.get("complete", 0) >= 15

    async def all_held() -> bool:
        return provider.held == CONCURRENCY

    async with Daemon(settings, providers=[provider], health=False) as daemon:
        assert daemon.pool and daemon.queries and daemon.notifier and daemon.worker
        await when(progressed, daemon.signals, "finished", timeout=30)
        # Hold every job the provider starts from now on: they stay running (processing)
        # while the page loads, and no count moves between the readings compared below.
        provider.gate.clear()
        await wait_until(all_held, timeout=10)
        await wait_until(lambda: settled(conn), timeout=10)
        await conn.execute(
            "UPDATE listener.results SET cost_usd = 0.0125 WHERE job_id IN "
            "(SELECT job_id FROM listener.results ORDER BY job_id LIMIT 8)"
        )
        await conn.execute(
            "INSERT INTO listener.provider_limits (provider, paused_until, pause_reason) "
            "VALUES ('openai', extract(epoch FROM clock_timestamp()) + 900, $1)",
            PAUSE_REASON,
        )

        sources = HealthSources(
            pool=daemon.pool,
            queries=daemon.queries,
            notifier=daemon.notifier,
            worker=daemon.worker,
            metrics=daemon.metrics,
            providers=[provider.name],
            started_at=time.monotonic(),
            budget_usd_per_day=settings.budget_usd_per_day,
        )
        app = build_app(sources)
        if not serves_page(app):
            app.router.add_get("/", page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/"

            before = await asyncio.to_thread(status_json, env)
            dumped = await chromium(browser, tmp_path / "profile-dom", "--dump-dom", url)
            after = await asyncio.to_thread(status_json, env)
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status_page.png"
            shot.unlink(missing_ok=True)
            await chromium(
                browser,
                tmp_path / "profile-shot",
                f"--screenshot={shot}",
                "--window-size=1280,1600",
                "--hide-scrollbars",
                url,
            )
        finally:
            await runner.cleanup()
        provider.gate.set()
        await jobs_finished(daemon, conn, 50, timeout=30)
    assert await counts(conn) == {"complete": 45, "failed": 5}

    # The counts held still between the two readings, with jobs running and waiting.
    assert {s: before.get(s, 0) for s in STATUSES} == {s: after.get(s, 0) for s in STATUSES}
    assert before["processing"] > 0 and before["pending"] > 0 and before["failed"] == 5

    dom = Dom(dumped)
    assert dom.find("title")[0].text == "listener status"
    assert dom.find("meta", http_equiv="refresh")[0].attrs["content"] == "5"
    assert not dom.find("script"), "a user's string became markup"

    # Counts and ages: the page read the same database at a moment between the readings.
    for status in STATUSES:
        assert int(dom.by_id(f"count-{status}").attrs["data-value"]) == before.get(status, 0)
    oldest = float(dom.by_id("oldest-pending").attrs["data-value"])
    assert before["oldest_pending_s"] - 0.01 <= oldest <= after["oldest_pending_s"] + 0.01
    assert float(dom.by_id("rate").attrs["data-value"]) == pytest.approx(before["rate_per_s"])
    eta = dom.by_id("eta").attrs["data-value"]
    assert before["eta_s"] is not None and float(eta) == pytest.approx(before["eta_s"], rel=0.01)
    daemon_info = dom.by_id("daemon").attrs
    assert 0 < int(daemon_info["data-in-flight"]) <= 2 * CONCURRENCY
    assert daemon_info["data-listen-connected"] == "true"

    # Per table and per owner.
    tables = {r.attrs["data-table"]: dom.cells(r) for r in dom.rows_with("by-table", "data-table")}
    assert tables == {
        row["table"]: {s: row.get(s, 0) for s in STATUSES} for row in before["by_table"]
    }
    assert set(tables) == {"public.photos"}
    owners = {r.attrs["data-owner"] for r in dom.rows_with("by-owner", "data-owner")}
    assert owners == {"alice", "bob", HOSTILE_OWNER}

    # Failures: the scripted reasons, escaped, as status --json reports them.
    reasons = {
        r.attrs["data-reason"]: int(r.attrs["data-count"])
        for r in dom.rows_with("failure-reasons", "data-reason")
    }
    assert reasons == {HOSTILE_ERROR: 3, TRUNCATED_ERROR: 2}
    assert reasons == {r["reason"]: r["count"] for r in before["failure_reasons"]}
    recent = dom.rows_with("recent-failures", "data-job-id")
    assert {r.attrs["data-source-id"] for r in recent} == {"3", "7", "11", "15", "19"}
    assert {r.attrs["data-job-id"] for r in recent} == {
        str(r["job_id"]) for r in before["recent_failures"]
    }
    errors = {dom.find("td", class_="error", within=r)[0].text for r in recent}
    assert errors == {HOSTILE_ERROR, TRUNCATED_ERROR}

    # Throughput over the last hour: every finished job is in some minute's bar.
    minutes = dom.find("g", class_="minute")
    assert len(minutes) == 60
    assert sum(int(m.attrs["data-complete"]) for m in minutes) == before["complete"]
    assert sum(int(m.attrs["data-failed"]) for m in minutes) == 5
    rects = dom.find("rect", within=dom.by_id("throughput"))
    assert rects and all(len(dom.find("title", within=r)) == 1 for r in rects)

    # Open batches, spend, budget and pauses.
    assert before.get("open_batches", []) == [] and dom.by_id("open-batches-none").text == "none"
    assert float(dom.by_id("spend-today").attrs["data-value"]) == before["spend_usd_today"] == 0.1
    assert float(dom.by_id("spend-total").attrs["data-value"]) == before["spend_usd_total"]
    assert float(dom.by_id("budget").attrs["data-value"]) == before["budget_usd_per_day"] == 2.5
    assert dom.by_id("budget-exhausted").attrs["data-value"] == "false"
    assert before["budget_exhausted"] is False
    (paused,) = dom.rows_with("paused-providers", "data-provider")
    assert paused.attrs["data-provider"] == "openai" and set(before["paused_providers"]) == {
        "openai"
    }
    remaining = float(paused.attrs["data-remaining-s"])
    assert (
        after["paused_providers"]["openai"]["remaining_s"] - 0.1
        <= remaining
        <= before["paused_providers"]["openai"]["remaining_s"] + 0.1
    )
    assert dom.find("td", class_="reason", within=paused)[0].text == PAUSE_REASON

    # The screenshot: a real PNG of the requested size, with more in it than a blank page.
    data = shot.read_bytes()
    assert png_size(data) == (1280, 1600)
    assert len(data) > 20_000, f"screenshot is only {len(data)} bytes"
