"""The documentation site: the generated reference pages match the code, and it builds.

``docs/reference/settings.md`` and ``docs/reference/cli.md`` are written by
``docs/gen_reference.py`` from ``listener.settings.Settings`` and the typer app; a change of a
setting or an option without ``python docs/gen_reference.py`` fails here. ``mkdocs build
--strict`` fails on a broken link, a missing anchor or a page left out of the navigation.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_reference", ROOT / "docs" / "gen_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_reference_pages_are_current() -> None:
    gen = generator()
    for path, text in gen.pages().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run python docs/gen_reference.py"
        )


def test_every_setting_and_every_command_is_on_its_page() -> None:
    from listener.cli import app
    from listener.settings import Settings

    gen = generator()
    settings_page = (ROOT / "docs" / "reference" / "settings.md").read_text(encoding="utf-8")
    for name, field in Settings.model_fields.items():
        nested = getattr(field.annotation, "model_fields", None)
        if nested is not None:
            for sub in nested:
                assert f"`LISTENER_{name.upper()}__{sub.upper()}`" in settings_page
        else:
            assert f"`LISTENER_{name.upper()}`" in settings_page
    cli_page = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    import typer

    for path, command in gen._commands(typer.main.get_command(app), []):
        assert f"## `listener {' '.join(path)}`" in cli_page
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert f"`{opt}" in cli_page


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("material", reason="mkdocs-material is in the dev extra")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "reference" / "settings" / "index.html").exists()
    assert (tmp_path / "decisions" / "0002-leases" / "index.html").exists()


def test_the_readme_is_a_front_door_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    demo = "python3 -m venv .venv && . .venv/bin/activate && pip install . && listener demo"
    tests = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev,bench]' && pytest"
    )
    assert demo in readme and tests in readme
    # CI runs the same test command (with the embedded extra too), and builds the site.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -q -e '.[dev,embedded,bench]'" in ci
    assert "\npytest\n" in ci
    assert "\nmkdocs build --strict\n" in ci
