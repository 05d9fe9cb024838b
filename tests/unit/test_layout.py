"""The package's tree is its architecture: few modules at the top, boundaries enforced.

The contracts live in ``.importlinter`` (the queue core imports nothing of the analysis side,
the app's side, operations or the CLI; the two sides do not import each other; only the CLI
and ``listener.app`` wire the daemon).
"""

from __future__ import annotations

import re
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


IMAGE_WORDS = re.compile(
    r"\b(images?|faces?|phash|sha256|rekognition|openai|bounding)\b", re.IGNORECASE
)


def test_the_queue_core_names_no_image_concept() -> None:
    """The queue core's source, comments and docstrings included, speaks of jobs, source rows
    and effects: what is analyzed, and how, belongs to the analysis side."""
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "listener" / "queue").glob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if IMAGE_WORDS.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_command_line_loads_no_analysis_library_before_a_command_needs_it() -> None:
    """``listener status`` or ``listener --help`` start without OpenCV, NumPy, Pillow, aiohttp
    or the cloud SDKs: each command imports what it runs (the daemon's memory starts lower)."""
    heavy = ("cv2", "numpy", "PIL", "aiohttp", "openai", "aioboto3", "botocore")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, listener.cli; print(' '.join({m.split('.')[0] for m in sys.modules}))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = set(done.stdout.split())
    assert not loaded & set(heavy), sorted(loaded & set(heavy))
