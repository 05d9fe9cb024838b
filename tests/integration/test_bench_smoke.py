"""The benchmark scripts still run on the current code and report their figures.

Each script runs as a subprocess at tiny sizes (``bench_queue.py --smoke``, a few thousand
rows for ``bench_scale.py``, a 2 s window for ``bench_fleet.py``, ``bench_health.py --smoke``,
``bench_peers.py --smoke`` without graphile-worker, ``bench_local.py --smoke``).
The tests check that every scenario ran and reported a value for each of its figures, never
how fast: at these sizes, on a shared machine, the figures mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
# A script's options to run on the session's server, without the wait for a quiet machine.
ON_SESSION_SERVER = ["--use-database-url", "--quiet-wait", "0"]


def run_script(
    args: list[str], timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python bench/<args>`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def script_env(database_url: str | None) -> dict[str, str]:
    """The environment for a script: no ``LISTENER_*`` or ``PGQUEUER_*`` variable of the
    developer's, and ``DATABASE_URL`` set to ``database_url`` (None: removed, so the script
    starts its own cluster)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTENER_", "PGQUEUER_"))}
    env.pop("DATABASE_URL", None)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    """The exit status and the tails of the output, for an assertion message."""
    return (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-3000:]}"
    )


def bench_json(
    args: list[str],
    out: Path,
    timeout_s: float,
    env: dict[str, str] | None,
    exits: tuple[int, ...] = (0,),
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``python bench/<args> --json <out>``: asserts that it exited with one of ``exits`` and
    wrote ``out``.

    Returns:
        The finished process and the JSON document it wrote.
    """
    proc = run_script([str(BENCH / args[0]), *args[1:], "--json", str(out)], timeout_s, env)
    assert proc.returncode in exits, explain(proc)
    assert out.exists(), explain(proc)
    doc: dict[str, Any] = json.loads(out.read_text())
    return proc, doc


def figures_by_scenario(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for figure in doc["figures"]:
        found.setdefault(figure["scenario"], []).append(figure)
    return found


def test_bench_queue_every_scenario_reports(pg_admin_dsn: str, tmp_path: Path) -> None:
    """Scenarios a-g on the session's server (``--use-database-url``), at smoke sizes."""
    out = tmp_path / "queue.json"
    env = script_env(pg_admin_dsn)
    proc, doc = bench_json(
        ["bench_queue.py", "--smoke", "--only", "a,b,c,d,e,f,g", *ON_SESSION_SERVER],
        out,
        timeout_s=100,
        env=env,
    )
    assert doc["errors"] == {}
    assert doc["details"]["sizes"]["throughput_jobs"] < 1000
    figures = figures_by_scenario(doc)
    assert sorted(figures) == ["a", "b", "c", "d", "e", "f", "g"]
    expected = {
        "a": "throughput from the app's INSERT, noop, concurrency 10",
        "b": "insert -> provider p99",
        "c": "overlap, noop 50 ms, concurrency 50",
        "d": "attached / plain, median of rounds",
        "e": "peak RSS, 300 jobs",
        "f": "3,000 rows before start: drain",
        "g": "2,000 rows while running: drain",
    }
    for scenario, name in expected.items():
        names = [f["name"] for f in figures[scenario]]
        assert name in names, (scenario, names)
    for scenario, rows in figures.items():
        for figure in rows:
            assert figure["value"] is not None, (scenario, figure)
            assert figure["verdict"] != "ERROR", (scenario, figure)
        assert f"\n{scenario}  " in proc.stdout, f"no printed line for {scenario}"
    assert set(doc["cpu_load_pct"]) == set(expected)
    # Every row of (b) reached the provider (a probe that no longer fits the Provider
    # protocol fails every job, and the scenario reports that as an error).
    assert doc["details"]["b"]["missing"] == 0
    assert doc["details"]["b"]["rows"] > 0


def test_bench_scale_reports_both_phases(tmp_path: Path) -> None:
    """Backfill and drain of a small table on the script's own cluster."""
    out = tmp_path / "scale.json"
    proc, doc = bench_json(
        ["bench_scale.py", "--rows", "2000", "--quiet-wait", "0", "--drain-timeout", "60"],
        out,
        timeout_s=110,
        env=None,
    )
    assert doc["errors"] == {}
    figures = figures_by_scenario(doc)
    assert sorted(figures) == ["1", "2"]
    values = {f["name"]: f["value"] for rows in figures.values() for f in rows}
    assert values["jobs after the backfill"] == 2000
    assert values["jobs enqueued by a second run"] == 0
    for name in (
        "backfill 2,000 rows, wall time",
        "backfill peak RSS (VmHWM, 50 ms poll)",
        "drain time",
        "drain rate",
        "daemon peak RSS (VmHWM before SIGTERM)",
    ):
        assert values.get(name) is not None, (name, sorted(values))
    assert "drain rate" in proc.stdout


def test_bench_fleet_reports(tmp_path: Path) -> None:
    """Two daemons sharing one OpenAI limit, a 2 s window after the warm-up.

    The exit status is 1 when the rate misses its targets, which at this size on a shared
    machine says nothing: the test only requires that the script finished and reported.
    """
    out = tmp_path / "fleet.json"
    env = script_env(None)
    proc, doc = bench_json(
        ["bench_fleet.py", "--daemons", "2", "--seconds", "2"],
        out,
        timeout_s=110,
        env=env,
        exits=(0, 1),
    )
    for key in (
        "requests",
        "rate_rps",
        "rate_pct_of_limit",
        "max_in_any_1s",
        "early_pct_of_worst_1s",
        "early_pct_of_calls",
        "violations",
        "gap_ms_p50",
    ):
        assert key in doc, (key, doc)
    assert doc["daemons"] == 2
    assert sum(doc["completed_by_worker"].values()) > 0, doc
    assert "% of the limit" in proc.stdout
    assert "worst sliding second" in proc.stdout


def test_bench_fleet_noop_reports(tmp_path: Path) -> None:
    """Two noop daemons sharing a limit of 500 calls/s through leases, a 2 s window.

    Each daemon is a ``bench/fleet_daemon.py`` process: both must have made calls."""
    out = tmp_path / "fleet-noop.json"
    env = script_env(None)
    proc, doc = bench_json(
        [
            "bench_fleet.py",
            "--provider",
            "noop",
            "--daemons",
            "2",
            "--rps",
            "500",
            "--seconds",
            "2",
        ],
        out,
        timeout_s=110,
        env=env,
        exits=(0, 1),
    )
    for key in ("rate_pct_of_limit", "early_pct_of_worst_1s", "limiter_round_trips"):
        assert key in doc, (key, doc)
    assert sorted(doc["calls_by_daemon"]) == ["bench-0", "bench-1"], doc
    assert all(n > 0 for n in doc["calls_by_daemon"].values()), doc
    assert "worst sliding second" in proc.stdout


def test_bench_health_reports_quiet_and_flood(pg_admin_dsn: str, tmp_path: Path) -> None:
    """Quiet and flooded drains at smoke size (300 jobs, 100 idle connections)."""
    out = tmp_path / "health.json"
    env = script_env(pg_admin_dsn)
    proc, doc = bench_json(
        ["bench_health.py", "--smoke", *ON_SESSION_SERVER],
        out,
        timeout_s=100,
        env=env,
    )
    assert doc["errors"] == {}
    assert doc["details"]["sizes"] == {"jobs": 300, "idle": 100}
    figures = figures_by_scenario(doc)
    assert sorted(figures) == ["f", "q"]
    names = {key: [f["name"] for f in rows] for key, rows in figures.items()}
    assert names["q"] == [
        "throughput, quiet",
        "/readyz p50",
        "/readyz p99",
        "/readyz probes failed",
    ]
    assert names["f"] == [
        "throughput, 100 idle connections",
        "/readyz p50",
        "/readyz p99",
        "/readyz probes failed",
        "throughput flood / quiet",
    ]
    for rows in figures.values():
        for figure in rows:
            assert figure["value"] is not None, figure
    (flood,) = doc["details"]["f"]
    assert flood["idle_opened"] > 0 and flood["probes_ok"] > 0
    assert "throughput flood / quiet" in proc.stdout


def test_bench_status_reports_every_figure(pg_admin_dsn: str, tmp_path: Path) -> None:
    """Status reads at 2,000 jobs on the session's server: every figure has a value."""
    out = tmp_path / "status.json"
    env = script_env(pg_admin_dsn)
    proc, doc = bench_json(
        ["bench_status.py", "--smoke", "--use-database-url"], out, timeout_s=110, env=env
    )
    assert doc["jobs"] == 2000 and doc["build"]["jobs"] == 2000
    names = {f["name"] for f in doc["figures"]}
    assert names == {
        "/status document (DB)",
        "/ page (DB + render)",
        "/metrics (DB)",
        "listener status --json (DB)",
        "GET /status (served)",
        "GET / (served)",
        "GET /metrics (served)",
        "listener status --json (subprocess)",
    }
    for figure in doc["figures"]:
        assert figure["p50_ms"] is not None and figure["n"] > 0, figure
    assert "GET /status (served)" in proc.stdout


def test_bench_compare_reports_a_ratio_per_figure(pg_admin_dsn: str, tmp_path: Path) -> None:
    """``compare.py HEAD --smoke --reuse-venv --only a,d`` on the session's server: every
    figure of a and d has both medians and a ratio, printed and in the JSON, and the two
    sides imported ``listener`` from different checkouts (the temporary one is gone after)."""
    out = tmp_path / "compare.json"
    env = script_env(pg_admin_dsn)
    proc, doc = bench_json(
        ["compare.py", "HEAD", "--smoke", "--reuse-venv", "--only", "a,d", *ON_SESSION_SERVER],
        out,
        timeout_s=110,
        env=env,
    )
    assert pg_admin_dsn not in proc.stdout + proc.stderr
    assert doc["errors"] == []
    assert doc["runs"] == 1 and doc["smoke"] is True
    new, old = doc["new"]["listener"], doc["old"]["listener"]
    assert Path(new) == ROOT / "listener"
    assert new != old and not Path(old).is_relative_to(ROOT), (new, old)
    assert [(r["side"], r["listener"]) for r in doc["run_log"]] == [("new", new), ("old", old)]
    assert not Path(old).exists(), "the temporary worktree was not removed"
    figures = figures_by_scenario(doc)
    assert sorted(figures) == ["a", "d"]
    assert "attached / plain, median of rounds" in [f["name"] for f in figures["d"]]
    for rows in figures.values():
        for figure in rows:
            assert figure["new_median"] is not None and figure["old_median"] is not None, figure
            assert figure["ratio"] == figure["new_median"] / figure["old_median"], figure
            assert figure["better"] in ("new", "old", "same"), figure
            lines = [line for line in proc.stdout.splitlines() if figure["name"] in line]
            assert lines and f" {figure['ratio']:.3f} " in lines[0], (figure, lines)
    directions = {f["name"]: f["direction"] for rows in figures.values() for f in rows}
    assert directions["attached / plain, median of rounds"] == "higher"
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert f"new: work tree {ROOT}, HEAD {head}" in proc.stdout
    assert f"PostgreSQL {doc['server_version']}" in proc.stdout


def test_bench_peers_every_scenario_compares(pg_admin_dsn: str, tmp_path: Path) -> None:
    """listener and pgqueuer in every scenario of ``bench_peers.py`` at smoke size.

    graphile-worker is left out (``--no-graphile``): it needs node and a registry (or a cache).
    """
    out = tmp_path / "peers.json"
    env = script_env(pg_admin_dsn)
    proc, doc = bench_json(
        ["bench_peers.py", "--smoke", "--no-graphile", *ON_SESSION_SERVER],
        out,
        timeout_s=110,
        env=env,
    )
    assert doc["errors"] == {}
    assert doc["sizes"]["drain_jobs"] < 1000 and doc["sizes"]["runs"] == 1
    runs = {(s["scenario"], s["peer"]) for s in doc["samples"]}
    scenarios = ["drain-20k", "drain-2-daemons", "latency"]
    assert runs == {(s, p) for s in scenarios for p in ("listener", "pgqueuer")}
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for row in doc["summary"]:
        by_scenario.setdefault(row["scenario"], []).append(row)
    assert sorted(by_scenario) == sorted(scenarios)
    for scenario, rows in by_scenario.items():
        for row in rows:
            assert row["median"]["listener"] is not None, (scenario, row)
            assert row["median"]["pgqueuer"] is not None, (scenario, row)
            assert row["advantage"]["pgqueuer"] is not None, (scenario, row)
            if scenario.startswith("drain"):
                assert row["verdict_target"] in ("PASS", "MISS"), row
                assert row["verdict_required"] in ("PASS", "MISS"), row
        assert f"\n{scenario} " in proc.stdout, f"no printed line for {scenario}"
    # Both worker processes of the two-daemon drain ran and reported, for each queue.
    for sample in doc["samples"]:
        if sample["scenario"] == "drain-2-daemons":
            assert len(sample["details"]["calls_by_worker"]) == 2, sample


def test_bench_local_reports_every_figure(tmp_path: Path) -> None:
    """``bench_local.py --smoke --against HEAD``: 1 s per phase, no database. Every figure is
    a positive number, printed; each scaling run found its worker processes; the two sides of
    ``--against`` imported ``listener`` from different checkouts, and the temporary one is
    gone after."""
    out = tmp_path / "local.json"
    proc, doc = bench_json(
        ["bench_local.py", "--smoke", "--against", "HEAD"], out, timeout_s=110, env=script_env(None)
    )
    figures = {f["key"]: f for f in doc["figures"]}
    stages = ["decode", "gray", "quality", "phash", "face_detection"]
    assert set(figures) == {
        "fetch_ms",
        *(f"{stage}_ms" for stage in stages),
        "stages_sum_ms",
        "analyze_bytes_ms",
        "fetch_and_analyze_ms",
        "analyze_bytes_images_per_s",
        "faces_bytes_ms",
        "faces_bytes_ms_per_face",
        "faces_found",
        "faces_decode_ms",
        "faces_detect_ms",
        "faces_embed_ms_per_face",
        "end_to_end_images_per_s_1",
        "worker_peak_rss_mb_1",
        "end_to_end_images_per_s_2",
        "worker_peak_rss_mb_2",
        "scaling_ratio",
        "processes_alone_images_per_s_1",
        "processes_alone_images_per_s_2",
        "processes_alone_ratio",
        "against_new_images_per_s",
        "against_old_images_per_s",
        "against_ratio",
    }
    for figure in figures.values():
        value = figure["value"]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, figure
    shares = [figures[f"{stage}_ms"]["share_pct"] for stage in ["fetch", *stages]]
    assert math.isclose(sum(shares), 100.0), shares
    assert doc["settings"]["smoke"] is True and doc["settings"]["seconds"] == 1.0
    assert "SOURCES.md" not in doc["settings"]["photos"] and len(doc["settings"]["photos"]) > 5
    runs = doc["scaling"]["runs"]
    assert [run["workers"] for run in runs] == [1, 2]
    for run in runs:
        assert run["images"] > 0, run
        assert len(run["worker_memory"]) == run["workers"], run
        for worker in run["worker_memory"]:
            assert worker["peak_rss_mb"] >= worker["rss_mb"] > 0, worker
        assert all(ms > 0 for ms in run["cpu_ms_per_image"].values()), run
    assert doc["scaling"]["verdict"] in ("PASS", "MISS")
    against = doc["against"]
    new, old = against["new"]["listener"], against["old"]["listener"]
    assert Path(new) == ROOT / "listener"
    assert new != old and not Path(old).is_relative_to(ROOT), (new, old)
    assert not Path(old).exists(), "the temporary worktree was not removed"
    for label in ("face detection", "analyze_bytes on one core", "workers=2 / workers=1"):
        assert label in proc.stdout, label
    assert "new / old" in proc.stdout


def test_bench_detectors_reports_recall_and_time(tmp_path: Path) -> None:
    """``bench_detectors.py --smoke``: dlib's HOG detector on two photographs of people and one
    without; it finds the faces of the photographs as shipped and reports a time."""
    proc, doc = bench_json(
        ["bench_detectors.py", "--smoke"], tmp_path / "detectors.json", 110, script_env(None)
    )
    (figure,) = doc["detectors"]
    assert figure["detector"] == "dlib hog 512"
    assert figure["faces"] == 12 and 0 < figure["found"] <= 12
    assert not any(m.endswith("as shipped") for m in figure["missed"]), figure
    assert figure["ms_per_image"] > 0
    assert "dlib hog 512" in proc.stdout


def test_bench_soak_reports_every_sample_and_check(pg_admin_dsn: str, tmp_path: Path) -> None:
    """``soak.py --smoke`` on the session's server: about 20 s of inserts at 40 rows/s into an
    attached table with every write-back column, a slow webhook and 10% failing calls, a
    sample every 2 s. Every sample carries every figure, every check passes, the PNG is
    drawn."""
    out = tmp_path / "soak.json"
    png = tmp_path / "soak.png"
    env = script_env(pg_admin_dsn)
    proc, doc = bench_json(
        ["soak.py", "--smoke", "--plot", str(png), *ON_SESSION_SERVER],
        out,
        timeout_s=110,
        env=env,
    )
    assert doc["error"] is None and doc["ok"] is True, doc["checks"]
    checks = {c["name"]: c for c in doc["checks"]}
    assert sorted(checks) == sorted(
        [
            "every row finished",
            "status columns",
            "outboxes drained",
            "events",
            "RSS flat",
            "kept up",
            "daemon exit",
        ]
    )
    assert all(c["ok"] for c in checks.values()), checks
    for name in checks:
        assert f"PASS  {name}: " in proc.stdout, name
    samples = doc["samples"]
    assert samples[0]["phase"] == "start" and samples[-1]["phase"] == "drain"
    load = [s for s in samples if s["phase"] == "load"]
    assert len(load) >= 5, samples
    for sample in load:
        for key in (
            "rss_mb",
            "rss_anon_mb",
            "backlog",
            "inserted",
            "finished",
            "latency_p50_ms",
            "latency_p99_ms",
            "insert_lag_p99_ms",
            "webhooks_delivered",
        ):
            assert sample.get(key) is not None, (key, sample)
        assert (
            set(sample["outbox"])
            == set(sample["outbox_max"])
            == {
                "status_outbox",
                "event_outbox",
                "inserted_rows",
                "deleted_rows",
            }
        )
        assert {"daemon", "receiver", "soak", "other"} <= set(sample["cpu_pct_of_core"])
        assert sample["rss_mb"] > 0
    summary = doc["summary"]
    assert summary["inserted"] > 0
    assert summary["inserted"] == summary["complete"] + summary["failed"]
    assert set(summary["outbox_max"]) == {
        "status_outbox",
        "event_outbox",
        "inserted_rows",
        "deleted_rows",
    }
    # Retries happened (10% of the calls failed on purpose), and every event was delivered.
    assert doc["daemon"]["log"]["lines_by_level"].get("INFO", 0) > 0
    assert doc["receiver"]["unique"] == summary["inserted"]
    assert png.read_bytes().startswith(b"\x89PNG")


def test_webhook_sink_counts_signed_deliveries_and_refuses_the_rest() -> None:
    """``bench/webhook_sink.py`` (the soak's slow receiver) on its own: it prints its port,
    answers a signed event 204 after its delay, counts a redelivery as a duplicate, refuses a
    bad signature and a body without an event id (400), reports it all on ``GET /stats`` and
    exits 0 on SIGTERM."""
    import time
    import urllib.error
    import urllib.request

    from listener.app_side.webhooks import SIGNATURE_HEADER, sign

    secret = "sink-secret"
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "webhook_sink.py"), "--secret", secret, "--delay-ms", "50"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"

        def post(body: bytes, signature: str) -> int:
            request = urllib.request.Request(
                f"{base}/hook", data=body, method="POST", headers={SIGNATURE_HEADER: signature}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return int(error.code)

        good = json.dumps({"event_id": 7, "status": "complete"}).encode()
        now = int(time.time())
        assert post(good, sign(secret, good, now)) == 204
        assert post(good, sign(secret, good, now)) == 204  # a redelivery
        assert post(good, sign("another-secret", good, now)) == 400
        no_id = json.dumps({"status": "failed"}).encode()
        assert post(no_id, sign(secret, no_id, now)) == 400
        with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
            stats = json.loads(response.read())
        assert stats["deliveries"] == 2 and stats["unique"] == 1, stats
        assert stats["duplicates"] == 1 and stats["bad"] == 2, stats
        assert stats["by_status"] == {"complete": 1} and stats["in_flight"] == 0, stats
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr


def test_bench_soak_under_tracemalloc_records_the_daemons_memory(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    """``soak.py --smoke --tracemalloc DIR`` runs the daemon under
    ``bench/tracemalloc_daemon.py``: every row still finishes, ``DIR`` gets a statistics line
    per sample (traced and allocator bytes, RSS) and snapshots, and the report carries them."""
    out = tmp_path / "soak.json"
    snaps = tmp_path / "snaps"
    _, doc = bench_json(
        ["soak.py", "--smoke", "--tracemalloc", str(snaps), *ON_SESSION_SERVER],
        out,
        timeout_s=110,
        env=script_env(pg_admin_dsn),
    )
    checks = {c["name"]: c for c in doc["checks"]}
    assert doc["error"] is None, doc
    assert checks["every row finished"]["ok"] and checks["status columns"]["ok"], checks
    lines = [json.loads(x) for x in (snaps / "stats.jsonl").read_text().splitlines()]
    assert len(lines) >= 3, lines
    for line in lines:
        assert line["traced_mb"] > 0 and line["malloc"]["arena"] > 0, line
    assert list(snaps.glob("snapshot-*.pickle")), sorted(p.name for p in snaps.iterdir())
    assert len(doc["tracemalloc_stats"]) == len(lines)
