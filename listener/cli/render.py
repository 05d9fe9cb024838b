"""Printing on the operator's terminal: the consoles, ``shown``, and the commands' tables.

Owner ids, table names, URLs and error texts are data: printed through Rich as they are, a
``[/]`` in one crashes the command (a markup error), ``[bold green]ALL OK[/]`` is rendered as
markup, and escape sequences (``ESC ] 0 ; title BEL`` sets the window title, OSC 8 makes
hyperlinks, CSI sequences move the cursor or clear the screen) reach the terminal. ``shown``
is the one helper every CLI output of such data goes through.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from listener.ops.status_page import OUTBOX_NAMES
from listener.redact import redact_text

if TYPE_CHECKING:
    from listener.analysis.estimate import Estimate
    from listener.settings import Settings

console = Console()
err_console = Console(stderr=True)

# Control characters (C0, DEL, C1), format characters (bidirectional overrides, zero-width
# joiners: they reorder or hide text) and the Unicode line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})


def shown(value: object) -> str:
    """``value`` as text to embed in a Rich markup string or a table cell.

    Args:
        value: any value; ``None`` is shown as an empty string.

    Returns:
        ``str(value)``, redacted (``listener.redact.redact_text``), with every control,
        format, separator, private-use or unassigned character replaced by its Python escape
        (``\\x1b``, ``\\x07``, ``\\u202e``), and Rich markup escaped (``[bold]`` prints as
        the text ``[bold]``). Printing it writes no escape sequence and interprets no markup.
    """
    if value is None:
        return ""
    text = redact_text(str(value))
    text = "".join(
        repr(c)[1:-1] if c != " " and unicodedata.category(c) in _UNSAFE_CATEGORIES else c
        for c in text
    )
    return escape(text)


def print_json(doc: Any) -> None:
    """``doc`` as one line of JSON on stdout (values JSON does not know as their ``str``)."""
    sys.stdout.write(json.dumps(doc, default=str) + "\n")


# --- status --------------------------------------------------------------------------------


def print_status(doc: dict[str, Any]) -> None:
    """``listener status``: jobs by table and status, the outboxes, owners, failures,
    throughput, pauses."""
    statuses = ("pending", "processing", "batched", "complete", "failed", "cancelled")
    table = Table(title="listener jobs")
    table.add_column("table")
    for key in statuses:
        table.add_column(key, justify="right")
    for row in doc["by_table"]:
        table.add_row(shown(row["table"]), *(shown(row[k]) for k in statuses))
    table.add_row("[bold]all[/bold]", *(f"[bold]{doc[k]}[/bold]" for k in statuses))
    console.print(table)
    print_outboxes(doc.get("outboxes", {}))
    if doc["by_owner"]:
        owners = Table(title=f"owners with the most work left (top {len(doc['by_owner'])})")
        for name in ("table", "owner", "pending", "processing", "complete", "failed"):
            owners.add_column(name, justify="left" if name in ("table", "owner") else "right")
        for row in doc["by_owner"]:
            owners.add_row(
                shown(row["table"]),
                shown(row["owner"]),
                *(shown(row[k]) for k in ("pending", "processing", "complete", "failed")),
            )
        console.print(owners)
    if doc["failure_reasons"]:
        reasons = Table(title="top failure reasons")
        reasons.add_column("jobs", justify="right")
        reasons.add_column("reason")
        for row in doc["failure_reasons"]:
            reasons.add_row(shown(row["count"]), shown(row["reason"]))
        console.print(reasons)
    eta = doc["eta_s"]
    console.print(
        f"throughput: {doc['rate_per_s']:.2f} jobs/s (last 5 min); "
        + (f"ETA {eta / 60:.1f} min" if eta is not None else "ETA -")
        + f"; oldest pending: {doc['oldest_pending_s']:.1f}s"
    )
    batches = doc["open_batches"]
    console.print(
        f"open batches: {len(batches)}"
        + "".join(
            f"\n  {shown(b['id'])} {shown(b['status'])} ({shown(b['requests'])} requests)"
            for b in batches
        )
    )
    waiting = doc.get("face_suggestions_open", 0)
    console.print(
        f"faces to review: {shown(waiting)} open suggestions"
        + (
            " ("
            + ", ".join(
                f"{'(no owner)' if r['owner'] is None else shown(r['owner'])}: "
                f"{shown(r['suggestions'])}"
                for r in doc.get("face_suggestions_by_owner", [])
            )
            + "; `listener faces suggestions --owner OWNER`)"
            if waiting
            else ""
        )
    )
    console.print(f"attached tables: {shown(', '.join(doc['tables'])) or 'none'}")
    budget = doc["budget_usd_per_day"]
    spend = f"spend: ${doc['spend_usd_today']:.4f} today, ${doc['spend_usd_total']:.4f} in all"
    if budget is not None:
        spend += f"; budget ${budget:.2f}/day" + (
            " [red]REACHED: paid providers wait until 00:00 UTC[/red]"
            if doc["budget_exhausted"]
            else ""
        )
    console.print(spend)
    if doc["dedup_reused_steps_total"]:
        console.print(
            f"deduplication saved: ${doc['dedup_saved_usd_today']:.6f} today "
            f"({doc['dedup_reused_steps_today']} steps reused), "
            f"${doc['dedup_saved_usd_total']:.6f} in all "
            f"({doc['dedup_reused_steps_total']} steps)"
        )
    for pause in doc["operator_pauses"]:
        what = "pipeline" if pause["provider"] == "*" else pause["provider"]
        left = pause["remaining_s"]
        console.print(
            f"[yellow]{what} paused by operator "
            + ("until resumed" if left is None else f"for {left:.0f}s")
            + f"[/yellow]: {pause['reason'] or 'no reason given'}"
        )
    for name, pause in doc["paused_providers"].items():
        console.print(
            f"[yellow]{shown(name)} paused for {pause['remaining_s']:.0f}s[/yellow]: "
            f"{shown(pause['reason'])}"
        )


def print_outboxes(outboxes: dict[str, dict[str, Any]]) -> None:
    """The outboxes of a status document (``{name: {"table", "depth", "depth_exact",
    "oldest_age_s"}}``): rows waiting in each (``~`` before an estimate) and how long the
    oldest has waited, seconds (``-`` when none waits)."""
    out = Table(title="outboxes")
    out.add_column("outbox")
    out.add_column("table")
    out.add_column("waiting", justify="right")
    out.add_column("oldest", justify="right")
    for name, info in outboxes.items():
        depth = info["depth"]
        out.add_row(
            shown(OUTBOX_NAMES.get(name, name)),
            shown(info["table"]),
            ("" if info["depth_exact"] else "~") + shown(depth),
            f"{info['oldest_age_s']:.1f}s" if depth else "-",
        )
    console.print(out)


# --- backfill ------------------------------------------------------------------------------


def print_owner_counts(rows: list[dict[str, Any]], title: str) -> None:
    """Rows selected per owner (``{"owner", "selected"}``), then their sum."""
    table_out = Table(title=title)
    table_out.add_column("owner")
    table_out.add_column("rows", justify="right")
    for row in rows:
        table_out.add_row(str(row["owner"]), str(row["selected"]))
    table_out.add_row("[bold]all[/bold]", f"[bold]{sum(r['selected'] for r in rows)}[/bold]")
    console.print(table_out)


def print_backfill_summary(summary: list[dict[str, Any]], failures: list[dict[str, Any]]) -> None:
    """The backfill's summary: per owner jobs, outcomes and faces; why jobs failed."""
    if not summary:
        return
    out = Table(title="backfill summary by owner")
    names = ("jobs", "complete", "failed", "remaining", "faces_found", "faces_assigned")
    out.add_column("owner")
    for name in names:
        out.add_column(name.replace("_", " "), justify="right")
    for row in summary:
        out.add_row(str(row["owner_id"]), *(str(row[k]) for k in names))
    console.print(out)
    if failures:
        reasons = Table(title="failures")
        reasons.add_column("jobs", justify="right")
        reasons.add_column("reason")
        for row in failures:
            reasons.add_row(str(row["count"]), str(row["reason"]))
        console.print(reasons)


def progress_bar() -> Progress:
    """The bar a followed backfill shows: done of total, failed, rate, spend, elapsed, ETA."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]:.1f}/s"),
        TextColumn("${task.fields[spend]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console)


def print_estimate(
    settings: Settings,
    count: int,
    sampled: int,
    result: Estimate,
    saved: dict[str, dict[str, float | int]] | None,
) -> None:
    """A dry run's estimate: per step images, calls, tokens, USD realtime and batch; the time
    at the rate limits; what deduplication saved (``saved``, None when it is off); the days
    of budget."""
    table_out = Table(title=f"estimate for {count} images ({sampled} sampled for sizes)")
    for column in ("step", "tier", "images", "calls", "input tok", "output tok"):
        table_out.add_column(column, justify="left" if column == "step" else "right")
    for column in ("realtime USD", "batch USD", "basis"):
        table_out.add_column(column, justify="left" if column == "basis" else "right")
    for s in result.steps:
        table_out.add_row(
            shown(s.step),
            str(s.tier),
            str(s.images),
            str(s.calls),
            str(s.input_tokens),
            str(s.output_tokens),
            f"{s.realtime_usd:.4f}",
            f"{s.batch_usd:.4f}",
            shown(s.basis),
        )
    table_out.add_row(
        "[bold]total[/bold]",
        "",
        "",
        "",
        "",
        "",
        f"[bold]{result.realtime_usd:.4f}[/bold]",
        f"[bold]{result.batch_usd:.4f}[/bold]",
        "",
    )
    console.print(table_out)
    if result.bottleneck:
        limit = settings.rate_limit(result.bottleneck)
        console.print(
            f"time at the rate limits: about {result.seconds / 60:.1f} min "
            f"({shown(result.bottleneck)} at {limit.rps:g} requests/s)"
        )
    else:
        console.print("time at the rate limits: no finite rate limit applies")
    if saved is not None:
        steps = sum(int(d["steps_total"]) for d in saved.values())
        usd = sum(float(d["usd_total"]) for d in saved.values())
        share = result.dedup_usd / result.realtime_usd if result.realtime_usd else 0.0
        console.print(
            f"deduplication ({shown(settings.dedup)}, scope {shown(settings.dedup_scope)}): "
            f"so far {steps} steps reused, ${usd:.6f} saved; at the recent reuse rate these "
            f"images would save about ${result.dedup_usd:.6f} ({share:.0%} of the realtime "
            "total; duplicates are known only once the images are fetched)"
        )
    else:
        console.print("deduplication: off (LISTENER_DEDUP): duplicate images are paid again")
    if settings.budget_usd_per_day is not None and result.realtime_usd:
        days = result.realtime_usd / settings.budget_usd_per_day
        console.print(f"budget: ${settings.budget_usd_per_day:.2f}/day -> about {days:.1f} days")


# --- faces ---------------------------------------------------------------------------------


def _owner(value: Any) -> str:
    return "(no owner)" if value is None else shown(value)


def _row(table: Any, source_id: Any) -> str:
    return f"{shown(table)} {shown(source_id)}" if table is not None else "-"


def face_counts_table(rows: list[dict[str, Any]]) -> Table:
    """Per owner: people, faces, faces in no person, open suggestions."""
    table = Table(title="faces per owner")
    table.add_column("owner")
    for name in ("people", "faces", "unassigned", "open suggestions"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            _owner(row["owner"]),
            *(shown(row[k]) for k in ("people", "faces", "unassigned", "open_suggestions")),
        )
    return table


def people_table(found: list[dict[str, Any]], every_owner: bool) -> Table:
    """People, most faces first, each with a sample face and its row (and owner, for all)."""
    table = Table(title="people, most faces first")
    table.add_column("person", justify="right")
    if every_owner:
        table.add_column("owner")
    table.add_column("name")
    table.add_column("faces", justify="right")
    table.add_column("sample face")
    table.add_column("in row")
    for row in found:
        cells = [shown(row["person_id"])]
        if every_owner:
            cells.append(_owner(row["owner"]))
        cells += [
            shown(row["name"]) or "-",
            shown(row["faces"]),
            shown(row["sample_face_id"]) or "-",
            _row(row["sample_source_table"], row["sample_source_id"]),
        ]
        table.add_row(*cells)
    return table


def suggestions_table(found: list[dict[str, Any]], every_owner: bool) -> Table:
    """Open suggestions: face, candidate, the candidate's person, similarity."""
    table = Table(title="open suggestions, most similar first")
    if every_owner:
        table.add_column("owner")
    for name in ("face", "in row", "candidate", "in row", "person", "similarity %"):
        table.add_column(name, justify="right" if name == "similarity %" else "left")
    for row in found:
        person = (
            "-"
            if row["person_id"] is None
            else f"{shown(row['person_id'])} {shown(row['person_name'] or '')}".rstrip()
        )
        cells = [_owner(row["owner"])] if every_owner else []
        cells += [
            shown(row["face_id"]),
            _row(row["source_table"], row["source_id"]),
            shown(row["candidate_face_id"]),
            _row(row["candidate_source_table"], row["candidate_source_id"]),
            person,
            f"{row['similarity']:.1f}",
        ]
        table.add_row(*cells)
    return table
