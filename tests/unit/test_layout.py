"""The package's tree is its architecture: few modules at the top, boundaries enforced.

The contracts live in ``.importlinter`` (the queue core imports nothing of the analysis side,
the app's side, operations or the CLI; the two sides do not import each other; only the CLI
and ``listener.app`` wire the daemon).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    """``lint-imports`` finds every contract kept; a forbidden import fails this test."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_at_most_six_modules_at_the_top() -> None:
    """Everything but the wiring, settings, errors and redaction lives in a package by role."""
    top = sorted(p.name for p in (ROOT / "listener").glob("*.py"))
    assert len(top) <= 6, top
