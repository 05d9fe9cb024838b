"""The status page: the ``/status`` document rendered as one self-contained HTML page.

Server-rendered, no JavaScript, no external resources (inline CSS and SVG, and a
Content-Security-Policy that forbids loading anything); a ``<meta http-equiv="refresh">``
reloads it every few seconds. Table names, owners, URLs and error texts come from users, so
every value is escaped with ``html.escape`` before it reaches the page; failed jobs' URLs and
errors are shown redacted (``listener.redact``), without credentials or query strings.

Every section carries stable ``id`` and ``data-*`` attributes holding the raw numbers, so tests
and scripts can read the page without parsing the formatted text:

- ``#count-<status>`` (``data-value``): jobs per status; ``#oldest-pending`` (seconds).
- ``#throughput``: an SVG with one ``g.minute`` per minute of the last hour
  (``data-minute``, ``data-complete``, ``data-failed``); ``#throughput-complete`` and
  ``#throughput-failed`` hold the hour's totals.
- ``#rate`` (jobs/s), ``#eta`` (seconds, empty when unknown).
- ``#by-table`` rows ``tr[data-table]`` with ``td[data-status][data-value]``; ``#by-owner``
  rows ``tr[data-table][data-owner]`` likewise.
- ``#open-batches`` rows ``tr[data-batch-id]``, or ``#open-batches-none``.
- ``#failure-reasons`` rows ``tr[data-reason][data-count]``.
- ``#recent-failures`` rows ``tr[data-job-id][data-table][data-source-id]`` with
  ``td.error``.
- ``#spend-today``, ``#spend-total`` (USD), ``#budget`` (USD, empty when none),
  ``#budget-exhausted`` (``true``/``false``); ``#dedup-saved`` (USD deduplication did not
  spend), ``#dedup-reused`` (steps reused); ``#paused-providers`` rows
  ``tr[data-provider][data-remaining-s]``.
- ``#face-suggestions-open`` (``data-value``): face suggestions waiting for review;
  ``#face-review`` rows ``tr[data-owner][data-suggestions]`` for the owners with the most
  (``data-owner`` is empty for rows without an owner).
- ``#outboxes`` rows ``tr[data-outbox][data-depth][data-depth-exact][data-oldest-age-s]``:
  the rows waiting in each outbox (``data-depth-exact`` ``false``: an estimate) and the
  seconds the oldest has waited.
- ``#daemon`` (``data-worker-id``, ``data-in-flight``, ...) when the document has them.

An empty list renders as an element ``#<section>-none`` reading "none".
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from listener.redact import redact_text, redact_url

STATUSES = ("pending", "processing", "batched", "complete", "failed", "cancelled")
"""The job statuses shown, in the order a job usually passes through them."""
OWNER_STATUSES = ("pending", "processing", "complete", "failed")
THROUGHPUT_MINUTES = 60

_CHART_W = 720
_CHART_H = 140
_CHART_TOP = 16
_CHART_BOTTOM = 18
_SLOT = _CHART_W / THROUGHPUT_MINUTES

_CSS = """
:root { color-scheme: light dark; --fg: #1d2330; --muted: #5d6677; --bg: #f4f6fa;
  --card: #fff; --line: #dde2ea; --ok: #2e9d5b; --bad: #d64545; --warn: #c98a12;
  --run: #2f6fd6; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e9ef; --muted: #9aa3b2;
  --bg: #12151b; --card: #1b2029; --line: #2c3340; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 20px 24px 32px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 18px;
  margin-bottom: 16px; }
h1 { margin: 0; font-size: 22px; }
h2 { margin: 0 0 10px; font-size: 15px; }
.muted, .meta { color: var(--muted); }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px; min-width: 0; }
section.wide { grid-column: 1 / -1; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.error, td.reason { word-break: break-word; }
table.tiles td { font-size: 26px; font-weight: 600; border: 0; text-align: center; }
table.tiles th { text-align: center; border: 0; }
#count-pending { color: var(--warn); } #count-processing { color: var(--run); }
#count-complete { color: var(--ok); } #count-failed { color: var(--bad); }
.facts { display: flex; flex-wrap: wrap; gap: 4px 28px; margin-top: 10px; }
.facts b { font-variant-numeric: tabular-nums; }
.none { color: var(--muted); font-style: italic; margin: 0; }
.bar { display: inline-block; height: 8px; background: var(--bad); border-radius: 2px;
  vertical-align: middle; }
.meter { height: 10px; background: var(--line); border-radius: 5px; overflow: hidden;
  margin: 6px 0 10px; }
.meter span { display: block; height: 100%; background: var(--ok); }
.meter.over span { background: var(--bad); }
.flag { font-weight: 600; color: var(--bad); }
svg { display: block; width: 100%; height: auto; max-width: 100%; }
svg .complete { fill: var(--ok); } svg .failed { fill: var(--bad); }
svg .axis { stroke: var(--line); } svg text { fill: var(--muted); font-size: 10px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px;
  border-radius: 2px; }
"""


def render(doc: Mapping[str, Any], *, refresh_s: int = 5, now: datetime | None = None) -> str:
    """The status page for ``doc``, a complete HTML document.

    Args:
        doc: the ``/status`` document (``listener.ops.status.queue_status`` plus the health
            server's daemon fields). Every key is optional; a missing or ``None`` value renders
            as zero, "none" or a dash. The shape read::

                pending, processing, batched, complete, failed, cancelled: int
                oldest_pending_s: float, seconds
                throughput_per_minute: [{"minute": ISO 8601, "complete": int, "failed": int}]
                    (minutes of the last hour with finished jobs; missing minutes are 0)
                rate_per_s: float, jobs finished per second; eta_s: float | None, seconds
                by_table: [{"table", "pending", "processing", "batched", "complete",
                    "failed", "cancelled"}]
                by_owner: [{"table", "owner", "pending", "processing", "complete", "failed"}]
                open_batches: [{"id", "provider", "step", "status", "requests", "completed",
                    "failed", "created_at": ISO 8601}]
                failure_reasons: [{"reason", "count"}]
                recent_failures: [{"job_id", "table", "source_id", "url", "error",
                    "at": ISO 8601}]
                spend_usd_today, spend_usd_total: float, USD
                dedup_saved_usd_total: float, USD; dedup_reused_steps_total: int
                budget_usd_per_day: float | None, USD; budget_exhausted: bool
                paused_providers: {name: {"remaining_s": float, "reason": str}}
                face_suggestions_open: int; face_suggestions_by_owner: [{"owner",
                    "suggestions"}]
                outboxes: {name: {"table", "depth": int, "depth_exact": bool,
                    "oldest_age_s": float, seconds}}
                worker_id, uptime_s, in_flight, concurrency, providers, listen_connected

        refresh_s: seconds between reloads (``<meta http-equiv="refresh">``); 0 or less: never.
        now: the time the throughput chart ends at (default: now, UTC).

    Returns:
        The page, ``text/html; charset=utf-8``.
    """
    now = now or datetime.now(UTC)
    sections = [
        _counts(doc),
        _throughput(doc, now),
        _by_table(doc),
        _outboxes(doc),
        _spend(doc),
        _failure_reasons(doc),
        _open_batches(doc),
        _face_review(doc),
        _by_owner(doc),
        _recent_failures(doc),
    ]
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">\n' if refresh_s > 0 else ""
    every = f" · refreshes every {int(refresh_s)} s" if refresh_s > 0 else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        + refresh
        + '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">\n"
        "<title>listener status</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        "<header><h1>listener status</h1>"
        f'<span class="meta" id="generated" data-value="{_e(now.isoformat())}">'
        f"{_e(_clock(now))}{every}</span>"
        f"{_daemon(doc)}</header>\n"
        "<main>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )


def _counts(doc: Mapping[str, Any]) -> str:
    heads = "".join(f"<th>{s}</th>" for s in STATUSES)
    cells = "".join(
        f'<td id="count-{s}" data-value="{_int(doc.get(s))}">{_int(doc.get(s)):,}</td>'
        for s in STATUSES
    )
    oldest = _float(doc.get("oldest_pending_s")) or 0.0
    rate = _float(doc.get("rate_per_s")) or 0.0
    eta = _float(doc.get("eta_s"))
    eta_value = "" if eta is None else _num(eta)
    return (
        '<section id="counts" class="wide"><h2>Jobs by status</h2>'
        f'<table class="tiles"><tr>{heads}</tr><tr>{cells}</tr></table>'
        '<div class="facts">'
        f'<span>oldest pending: <b id="oldest-pending" data-value="{_num(oldest)}">'
        f"{_duration(oldest) if oldest > 0 else '-'}</b></span>"
        f'<span>rate: <b id="rate" data-value="{_num(rate)}">{rate:.2f} jobs/s</b>'
        f' <span class="muted">({rate * 60:,.0f}/min, last 5 min)</span></span>'
        f'<span>ETA for the rest: <b id="eta" data-value="{eta_value}">'
        f"{_duration(eta)}</b></span>"
        "</div></section>"
    )


def _throughput(doc: Mapping[str, Any], now: datetime) -> str:
    per_minute: dict[datetime, tuple[int, int]] = {}
    for row in _rows(doc.get("throughput_per_minute")):
        minute = _parse_time(row.get("minute"))
        if minute is not None:
            key = minute.replace(second=0, microsecond=0)
            done, failed = per_minute.get(key, (0, 0))
            per_minute[key] = (done + _int(row.get("complete")), failed + _int(row.get("failed")))
    end = now.astimezone(UTC).replace(second=0, microsecond=0)
    if per_minute:
        # The database's clock may run a little ahead of this one: keep its last minute.
        end = max(end, max(per_minute))
    minutes = [
        end - timedelta(minutes=THROUGHPUT_MINUTES - 1 - i) for i in range(THROUGHPUT_MINUTES)
    ]
    counts = [per_minute.get(m, (0, 0)) for m in minutes]
    peak = max((c + f for c, f in counts), default=0)
    scale = (_CHART_H - _CHART_TOP - _CHART_BOTTOM) / max(peak, 1)
    base = _CHART_H - _CHART_BOTTOM
    bars: list[str] = []
    for i, (minute, (done, failed)) in enumerate(zip(minutes, counts, strict=True)):
        x = i * _SLOT + 1
        label = f"{minute:%H:%M} UTC"
        parts = [
            f'<g class="minute" data-minute="{_e(minute.isoformat())}" '
            f'data-complete="{done}" data-failed="{failed}">'
        ]
        h_done = done * scale
        h_failed = failed * scale
        if done:
            parts.append(
                f'<rect class="complete" x="{x:.1f}" y="{base - h_done:.1f}" '
                f'width="{_SLOT - 2:.1f}" height="{h_done:.1f}">'
                f"<title>{label}: {done} complete</title></rect>"
            )
        if failed:
            parts.append(
                f'<rect class="failed" x="{x:.1f}" y="{base - h_done - h_failed:.1f}" '
                f'width="{_SLOT - 2:.1f}" height="{h_failed:.1f}">'
                f"<title>{label}: {failed} failed</title></rect>"
            )
        parts.append("</g>")
        bars.append("".join(parts))
    total_done = sum(c for c, _ in counts)
    total_failed = sum(f for _, f in counts)
    svg = (
        f'<svg id="throughput" viewBox="0 0 {_CHART_W} {_CHART_H}" role="img" '
        f'aria-label="jobs finished per minute, last hour" data-peak="{peak}">'
        f'<line class="axis" x1="0" y1="{base}" x2="{_CHART_W}" y2="{base}"/>'
        f'<line class="axis" x1="0" y1="{_CHART_TOP}" x2="{_CHART_W}" y2="{_CHART_TOP}" '
        'stroke-dasharray="3 3"/>'
        f'<text x="2" y="{_CHART_TOP - 4}">{peak}/min</text>'
        + "".join(bars)
        + f'<text x="2" y="{_CHART_H - 4}">{_e(f"{minutes[0]:%H:%M}")}</text>'
        f'<text x="{_CHART_W - 2}" y="{_CHART_H - 4}" text-anchor="end">'
        f"{_e(f'{minutes[-1]:%H:%M}')} UTC</text>"
        "</svg>"
    )
    return (
        '<section id="throughput-section" class="wide"><h2>Throughput, last hour '
        '<span class="legend muted"><i style="background: var(--ok)"></i>complete'
        '<i style="background: var(--bad)"></i>failed</span></h2>'
        f"{svg}"
        '<div class="facts">'
        f'<span>complete: <b id="throughput-complete" data-value="{total_done}">'
        f"{total_done:,}</b></span>"
        f'<span>failed: <b id="throughput-failed" data-value="{total_failed}">'
        f"{total_failed:,}</b></span></div></section>"
    )


def _by_table(doc: Mapping[str, Any]) -> str:
    rows = _rows(doc.get("by_table"))
    body = "".join(
        f'<tr data-table="{_e(row.get("table"))}"><td>{_e(row.get("table"))}</td>'
        + "".join(_count_cell(row, s) for s in STATUSES)
        + "</tr>"
        for row in rows
    )
    heads = "<th>table</th>" + "".join(f'<th class="n">{s}</th>' for s in STATUSES)
    return _section("by-table", "Jobs by table", heads, body)


OUTBOX_NAMES = {
    "status": "status write-back",
    "events": "webhook events",
    "deleted": "deleted rows to clean up",
    "inserted": "inserted rows to admit",
}
"""What each outbox of the document holds, as the page names it."""


def _outboxes(doc: Mapping[str, Any]) -> str:
    """The queues beside the jobs: rows waiting in each, and how long the oldest has."""
    found = doc.get("outboxes")
    outboxes = found if isinstance(found, Mapping) else {}
    rows = []
    for name, info in outboxes.items():
        if not isinstance(info, Mapping):
            continue
        depth = _int(info.get("depth"))
        exact = info.get("depth_exact") is not False
        age = _float(info.get("oldest_age_s")) or 0.0
        rows.append(
            f'<tr data-outbox="{_e(name)}" data-depth="{depth}" '
            f'data-depth-exact="{"true" if exact else "false"}" data-oldest-age-s="{_num(age)}">'
            f"<td>{_e(OUTBOX_NAMES.get(str(name), name))}</td>"
            f'<td class="muted">{_e(info.get("table"))}</td>'
            f'<td class="n">{"" if exact else "~"}{depth:,}</td>'
            f'<td class="n">{_duration(age) if depth else "-"}</td></tr>'
        )
    heads = '<th>outbox</th><th>table</th><th class="n">waiting</th><th class="n">oldest</th>'
    return _section("outboxes", "Outboxes", heads, "".join(rows))


def _by_owner(doc: Mapping[str, Any]) -> str:
    rows = _rows(doc.get("by_owner"))
    body = "".join(
        f'<tr data-table="{_e(row.get("table"))}" data-owner="{_e(row.get("owner"))}">'
        f"<td>{_e(row.get('table'))}</td><td>{_e(row.get('owner'))}</td>"
        + "".join(_count_cell(row, s) for s in OWNER_STATUSES)
        + "</tr>"
        for row in rows
    )
    heads = "<th>table</th><th>owner</th>" + "".join(
        f'<th class="n">{s}</th>' for s in OWNER_STATUSES
    )
    return _section("by-owner", "Owners with the most work left", heads, body, wide=True)


def _open_batches(doc: Mapping[str, Any]) -> str:
    rows = _rows(doc.get("open_batches"))
    body = "".join(
        f'<tr data-batch-id="{_e(row.get("id"))}" data-status="{_e(row.get("status"))}" '
        f'data-requests="{_int(row.get("requests"))}">'
        f"<td>{_e(row.get('id'))}</td><td>{_e(row.get('provider'))}</td>"
        f"<td>{_e(row.get('status'))}</td>"
        f'<td class="n">{_int(row.get("requests")):,}</td>'
        f'<td class="n">{_int(row.get("completed")):,}</td>'
        f'<td class="n">{_int(row.get("failed")):,}</td>'
        f"<td>{_time(row.get('created_at'))}</td></tr>"
        for row in rows
    )
    heads = (
        '<th>batch</th><th>provider</th><th>status</th><th class="n">requests</th>'
        '<th class="n">done</th><th class="n">failed</th><th>created</th>'
    )
    return _section("open-batches", "Open batches", heads, body)


def _face_review(doc: Mapping[str, Any]) -> str:
    """Face suggestions waiting for a person to accept or reject them, per owner."""
    waiting = _int(doc.get("face_suggestions_open"))
    rows = _rows(doc.get("face_suggestions_by_owner"))
    body = "".join(
        f'<tr data-owner="{_e(row.get("owner"))}" '
        f'data-suggestions="{_int(row.get("suggestions"))}">'
        f"<td>{_e(row.get('owner')) if row.get('owner') is not None else '(no owner)'}</td>"
        f'<td class="n">{_int(row.get("suggestions")):,}</td></tr>'
        for row in rows
    )
    heads = '<th>owner</th><th class="n">open suggestions</th>'
    return (
        '<section id="face-review-section"><h2>Faces to review</h2>'
        '<div class="facts"><span>open suggestions: '
        f'<b id="face-suggestions-open" data-value="{waiting}">{waiting:,}</b></span>'
        '<span class="muted">listener faces suggestions --owner OWNER</span></div>'
        f"{_table('face-review', heads, body)}</section>"
    )


def _failure_reasons(doc: Mapping[str, Any]) -> str:
    rows = _rows(doc.get("failure_reasons"))
    top = max((_int(r.get("count")) for r in rows), default=0)
    body = "".join(
        f'<tr data-reason="{_e(_redacted(row.get("reason")))}" '
        f'data-count="{_int(row.get("count"))}">'
        f'<td class="n">{_int(row.get("count")):,}</td>'
        f'<td><span class="bar" style="width: {_bar_px(_int(row.get("count")), top)}px">'
        f'</span></td><td class="reason">{_e(_redacted(row.get("reason")))}</td></tr>'
        for row in rows
    )
    heads = '<th class="n">jobs</th><th></th><th>reason</th>'
    return _section("failure-reasons", "Top failure reasons", heads, body)


def _recent_failures(doc: Mapping[str, Any]) -> str:
    rows = _rows(doc.get("recent_failures"))
    body = "".join(
        f'<tr data-job-id="{_e(row.get("job_id"))}" data-table="{_e(row.get("table"))}" '
        f'data-source-id="{_e(row.get("source_id"))}">'
        f'<td class="n">{_e(row.get("job_id"))}</td><td>{_e(row.get("table"))}</td>'
        f'<td title="{_e(_redacted_url(row.get("url")))}">{_e(row.get("source_id"))}</td>'
        f'<td class="error">{_e(_redacted(row.get("error")))}</td>'
        f"<td>{_time(row.get('at'))}</td></tr>"
        for row in rows
    )
    heads = '<th class="n">job</th><th>table</th><th>row</th><th>error</th><th>at</th>'
    return _section("recent-failures", "Recent failures", heads, body, wide=True)


def _spend(doc: Mapping[str, Any]) -> str:
    today = _float(doc.get("spend_usd_today")) or 0.0
    total = _float(doc.get("spend_usd_total")) or 0.0
    budget = _float(doc.get("budget_usd_per_day"))
    exhausted = bool(doc.get("budget_exhausted"))
    if budget is None:
        meter = '<p class="muted">no daily budget set</p>'
    else:
        share = min(today / budget, 1.0) if budget > 0 else 1.0
        meter = (
            f'<div class="meter{" over" if exhausted else ""}" '
            f'title="{share:.0%} of the daily budget">'
            f'<span style="width: {share * 100:.1f}%"></span></div>'
        )
    flag = (
        ' class="flag">budget exhausted: paid providers wait for the next UTC day'
        if exhausted
        else ">"
    )
    paused = doc.get("paused_providers")
    pauses = paused if isinstance(paused, Mapping) else {}
    body = "".join(
        f'<tr data-provider="{_e(name)}" data-remaining-s="{_num(_remaining(info))}">'
        f"<td>{_e(name)}</td><td>{_duration(_remaining(info))}</td>"
        f'<td class="reason">{_e(info.get("reason") if isinstance(info, Mapping) else "")}'
        "</td></tr>"
        for name, info in pauses.items()
    )
    table = _table("paused-providers", "<th>provider</th><th>resumes in</th><th>reason</th>", body)
    saved = _float(doc.get("dedup_saved_usd_total")) or 0.0
    reused = _float(doc.get("dedup_reused_steps_total")) or 0.0
    return (
        '<section id="spend"><h2>Spend and budget</h2>'
        '<div class="facts">'
        f'<span>today: <b id="spend-today" data-value="{_num(today)}">{_usd(today)}</b></span>'
        f'<span>daily budget: <b id="budget" data-value="{_num(budget)}">'
        f"{_usd(budget) if budget is not None else 'none'}</b></span>"
        f'<span>all time: <b id="spend-total" data-value="{_num(total)}">{_usd(total)}</b>'
        "</span>"
        f'<span id="budget-exhausted" data-value="{"true" if exhausted else "false"}"'
        f"{flag}</span></div>"
        '<div class="facts">'
        f'<span>saved by deduplication: <b id="dedup-saved" data-value="{_num(saved)}">'
        f"{_usd(saved)}</b></span>"
        f'<span>steps reused: <b id="dedup-reused" data-value="{_num(reused)}">'
        f"{int(reused)}</b></span></div>"
        f"{meter}<h2>Paused providers</h2>{table}</section>"
    )


def _daemon(doc: Mapping[str, Any]) -> str:
    """The daemon serving the page, when the document says (the health server adds these)."""
    if "worker_id" not in doc:
        return ""
    providers = doc.get("providers")
    names = ", ".join(str(p) for p in providers) if isinstance(providers, list) else ""
    connected = bool(doc.get("listen_connected"))
    return (
        f'<span class="meta" id="daemon" data-worker-id="{_e(doc.get("worker_id"))}" '
        f'data-in-flight="{_int(doc.get("in_flight"))}" '
        f'data-concurrency="{_int(doc.get("concurrency"))}" '
        f'data-listen-connected="{"true" if connected else "false"}">'
        f"worker {_e(doc.get('worker_id'))} · {_int(doc.get('in_flight'))}/"
        f"{_int(doc.get('concurrency'))} in flight · providers: {_e(names) or '-'}"
        f" · LISTEN {'up' if connected else 'down'}"
        f" · up {_duration(_float(doc.get('uptime_s')))}</span>"
    )


def _section(ident: str, title: str, heads: str, body: str, *, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return (
        f'<section id="{ident}-section"{cls}><h2>{title}</h2>{_table(ident, heads, body)}</section>'
    )


def _table(ident: str, heads: str, body: str) -> str:
    """A table with ``id=ident``, or ``<p id="ident-none">none</p>`` when ``body`` is empty."""
    if not body:
        return f'<p class="none" id="{ident}-none">none</p>'
    return f'<table id="{ident}"><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>'


def _count_cell(row: Mapping[str, Any], status: str) -> str:
    n = _int(row.get(status))
    return f'<td class="n" data-status="{status}" data-value="{n}">{n:,}</td>'


def _rows(value: object) -> list[Mapping[str, Any]]:
    """The mappings of a list in the document; anything else is no rows."""
    if not isinstance(value, Iterable) or isinstance(value, str | bytes | Mapping):
        return []
    return [row for row in value if isinstance(row, Mapping)]


def _remaining(info: object) -> float | None:
    return _float(info.get("remaining_s")) if isinstance(info, Mapping) else None


def _e(value: object) -> str:
    """``value`` as text, escaped for HTML content and quoted attributes; None is empty."""
    return "" if value is None else html.escape(str(value), quote=True)


def _redacted(value: object) -> str | None:
    """``value`` through ``redact_text`` (the document is redacted already; a page rendered
    from another source is too)."""
    return None if value is None else redact_text(str(value))


def _redacted_url(value: object) -> str | None:
    return None if value is None else redact_url(str(value))


def _int(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | str):
        try:
            return int(float(value))
        except ValueError:
            return 0
    return 0


def _float(value: object) -> float | None:
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _num(value: float | None) -> str:
    """A number for a ``data-value`` attribute: ``repr`` precision, empty for None."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _usd(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:,.4f}" if 0 < abs(value) < 1 else f"${value:,.2f}"


def _duration(seconds: float | None) -> str:
    """``42s``, ``3m 12s``, ``2h 05m``, ``3d 4h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _bar_px(count: int, top: int) -> int:
    return max(round(120 * count / top), 2) if top and count else 0


def _parse_time(value: object) -> datetime | None:
    """An ISO 8601 string (or a datetime) as an aware UTC datetime; None if it is neither."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _clock(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _time(value: object) -> str:
    """A ``<time>`` element for an ISO timestamp; the raw text, escaped, if it is not one."""
    parsed = _parse_time(value)
    if parsed is None:
        return _e(value)
    return f'<time datetime="{_e(parsed.isoformat())}">{_clock(parsed)}</time>'
