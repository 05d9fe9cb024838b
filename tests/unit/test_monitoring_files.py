"""deploy/: the Prometheus rules and the Grafana dashboard query metrics listener really serves.

Every ``listener_*`` series named in a rule's or a panel's PromQL must be one that
``listener.ops.metrics.Metrics`` exposes (a counter's ``_total``, a histogram's ``_bucket`` /
``_sum`` / ``_count``, a gauge's name), and every label matched on must be one of that
metric's labels, so renaming a metric or a label breaks this test. ``promtool check rules``
validates the rules file's syntax where Prometheus's ``promtool`` is installed (CI installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from listener.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "listener-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "listener-dashboard.json"
SERIES = re.compile(r"\b(listener_[a-zA-Z0-9_]+)(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def served_series() -> dict[str, set[str]]:
    """Series name -> label names, for every metric in listener's registry."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    series: dict[str, set[str]] = {}
    metrics = Metrics(time.monotonic)
    for family in metrics.registry.collect():
        labels = set(_labelnames(metrics, family.name))
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def _labelnames(metrics: Metrics, family: str) -> tuple[str, ...]:
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        if name is not None and name.removesuffix("_total") == family:
            return tuple(getattr(value, "_labelnames", ()))
    raise AssertionError(f"no collector for {family}")


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def panel_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def check_expr(expr: str, served: dict[str, set[str]]) -> set[str]:
    """The listener series ``expr`` uses; fails on an unknown series or label."""
    used = set()
    for match in SERIES.finditer(expr):
        name, matchers = match.group(1), match.group(2) or ""
        assert name in served, f"{name} (in {expr!r}) is not a metric listener serves"
        for label in MATCHER.findall(matchers):
            assert label in served[name] | {"instance", "job"}, f"{name} has no label {label}"
        used.add(name)
    return used


def test_every_alert_queries_metrics_listener_serves() -> None:
    served = served_series()
    alerts = rules()
    assert {rule["alert"] for rule in alerts} >= {
        "ListenerDown",
        "ListenerJobsFailing",
        "ListenerDeadLettersGrowing",
        "ListenerOldestPendingJob",
        "ListenerOutboxNotDraining",
        "ListenerProviderErrors",
    }
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        used = check_expr(rule["expr"], served)
        assert used or 'up{job="listener"}' in rule["expr"], rule["alert"]


def test_every_panel_queries_metrics_listener_serves_and_covers_them_all() -> None:
    served = served_series()
    used: set[str] = set()
    exprs = panel_exprs()
    assert exprs
    for expr in exprs:
        used |= check_expr(expr, served)
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in served}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert families == shown, f"metrics without a panel: {sorted(families - shown)}"


def test_a_renamed_metric_is_caught() -> None:
    served = served_series()
    with pytest.raises(AssertionError, match="listener_jobs_done_total"):
        check_expr("rate(listener_jobs_done_total[5m])", served)
    with pytest.raises(AssertionError, match="no label state"):
        check_expr('listener_queue_jobs{state="failed"}', served)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_an_outbox_that_stops_draining_alerts_for_that_outbox_only(tmp_path: Path) -> None:
    """``promtool test rules`` on made-up series: the status outbox's oldest row ages a minute
    a minute (stuck; two daemons report it), the events outbox's comes and goes (it drains).
    Over 300 s from minute 6 on, held 5 minutes: one alert, for the status outbox, from
    minute 11."""
    [rule] = [r for r in rules() if r["alert"] == "ListenerOutboxNotDraining"]
    age = "listener_outbox_oldest_age_seconds"
    stuck = [
        {
            "series": f'{age}{{outbox="status", instance="{i}:8080", job="listener"}}',
            "values": "0+60x20",
        }
        for i in ("a", "b")
    ]
    draining = {
        "series": f'{age}{{outbox="events", instance="a:8080", job="listener"}}',
        "values": "0 30 0 45 0 20" + " 0" * 15,
    }
    fired = {
        "exp_labels": {"severity": "warning", "outbox": "status"},
        "exp_annotations": {
            "summary": "the status outbox's oldest row has waited 11m 0s",
            "description": rule["annotations"]["description"],
        },
    }
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [*stuck, draining],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": rule["alert"], "exp_alerts": []},
                    {"eval_time": "11m", "alertname": rule["alert"], "exp_alerts": [fired]},
                ],
            }
        ],
    }
    path = tmp_path / "outbox_alert_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_served_metric_is_documented() -> None:
    """docs/reference/metrics.md lists every metric family listener serves, as scraped."""
    page = (ROOT / "docs" / "reference" / "metrics.md").read_text(encoding="utf-8")
    suffix = {"counter": "_total", "histogram": "", "gauge": ""}
    for family in Metrics(time.monotonic).registry.collect():
        assert f"`{family.name}{suffix[family.type]}`" in page, family.name
