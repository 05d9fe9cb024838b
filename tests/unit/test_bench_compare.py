"""bench/compare.py's pure parts: which way a figure is better, the verdict, redaction."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def compare(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/compare.py as a module (it imports bench_queue from its own directory)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def figure(unit: str, target: float | None = None, better: str = "higher") -> dict[str, object]:
    return {
        "scenario": "b",
        "name": "x",
        "value": 1.0,
        "unit": unit,
        "target": target,
        "better": better,
    }


def test_direction_from_target_else_from_unit(compare: ModuleType) -> None:
    assert compare.direction(figure("ms", 2.0, "lower")) == "lower"
    assert compare.direction(figure("jobs/s", 5000.0)) == "higher"
    # Informational figures keep the default "higher": their unit decides.
    assert compare.direction(figure("ms")) == "lower"
    assert compare.direction(figure("MB")) == "lower"
    assert compare.direction(figure("%")) == "higher"
    assert compare.direction(figure("rows/s")) == "higher"


def test_better_side_follows_the_direction(compare: ModuleType) -> None:
    assert compare.better_side(1.10, "higher") == ("new", pytest.approx(10.0))
    assert compare.better_side(0.80, "higher") == ("old", pytest.approx(20.0))
    assert compare.better_side(0.80, "lower") == ("new", pytest.approx(20.0))
    assert compare.better_side(1.25, "lower") == ("old", pytest.approx(25.0))
    assert compare.better_side(1.0, "lower")[0] == "same"
    assert compare.better_side(None, "higher") == ("", None)


def test_collect_medians_and_ratio(compare: ModuleType) -> None:
    def run(side: str, values: list[float | None]) -> object:
        figs = [figure("ms", 2.0, "lower") | {"value": v} for v in values]
        return compare.Run(side, 1, 0, 1.0, figures=figs)

    runs = [run("new", [1.0]), run("old", [2.0]), run("new", [3.0]), run("old", [None])]
    (row,) = compare.collect(runs)
    assert row.new == [1.0, 3.0] and row.old == [2.0]
    assert row.ratio == pytest.approx(1.0)
    runs = [run("new", [1.0]), run("old", [4.0])]
    (row,) = compare.collect(runs)
    assert row.as_json()["better"] == "new" and row.as_json()["ratio"] == pytest.approx(0.25)


def test_redact_hides_passwords(compare: ModuleType) -> None:
    text = "failed: postgresql://bench:s3cret@db:5432/x and password=hunter2 host=db"
    clean = compare.redact(text, ["exact-secret"])
    assert "s3cret" not in clean and "hunter2" not in clean
    assert "postgresql://bench:***@db:5432/x" in clean
    assert compare.redact("an exact-secret here", ["exact-secret"]) == "an *** here"
