"""The tiered pipeline from a TOML file (LISTENER_PIPELINE_FILE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from listener.analysis.pipeline import build_plan
from listener.settings import Settings


def test_pipeline_file_sets_the_tiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(
        "[tiers]\n"
        'tier1 = ["local", "rekognition", "openai"]\n'
        'tier2 = ["openai"]\n'
        "tier2_min_quality = 7.5\n"
        "faces = true\n"
    )
    monkeypatch.setenv("LISTENER_PIPELINE", "tiered")
    monkeypatch.setenv("LISTENER_PIPELINE_FILE", str(path))
    settings = Settings(_env_file=None)
    plan = build_plan(settings.pipeline, settings.tiers)
    assert [s.name for s in plan.steps] == [
        "local.analysis",
        "rekognition.labels",
        "openai.tier1",
        "rekognition.faces",
        "openai.tier2",
    ]
    assert plan.tier2_min_quality == 7.5


def test_openai_key_from_the_usual_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    settings = Settings(_env_file=None)
    assert settings.openai.api_key is not None
    assert settings.openai.api_key.get_secret_value() == "sk-from-env"
    assert "sk-from-env" not in repr(settings)


def test_a_bad_pipeline_file_is_one_line_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("LISTENER_PIPELINE_FILE", str(missing))
    with pytest.raises(ValueError, match=r"LISTENER_PIPELINE_FILE='.*nope.toml': cannot read it"):
        Settings(_env_file=None)
    bad = tmp_path / "tiers.toml"
    bad.write_text('[tiers]\ntier3_min_side = "big"\n')
    monkeypatch.setenv("LISTENER_PIPELINE_FILE", str(bad))
    with pytest.raises(ValueError, match=r"tiers\.tier3_min_side='big': Input should be a valid"):
        Settings(_env_file=None)
