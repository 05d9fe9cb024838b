"""The code blocks of ``docs/`` that the tests run or compare with a real run.

A block is marked by an HTML comment on the line before its fence, which MkDocs does not show:

- ``<!-- tested -->``: a walk-through. ``tests/integration/test_docs_commands.py`` runs its
  commands, in order, against a database of its own. In a ``sh`` block every line is a command
  (``\\`` continues it; ``#`` starts a comment); in a ``console`` block the lines that start
  with ``$ `` are, and the lines after one are what it prints: each must appear in its output.
- ``<!-- tested: NAME -->``: a block a test compares with a program's output
  (``listener demo output``: ``tests/integration/test_demo.py``).

Printed output is compared after ``normalise``: timestamps, durations, ports and whitespace
(Rich pads and wraps to the terminal's width) do not count, and ``...`` in a documented line
stands for anything.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"

_MARKED = re.compile(
    r"^<!-- tested(?:: (?P<name>[^>]*?))? -->\n```(?P<lang>\w*)\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
_LOG_TIME = re.compile(r"\b\d\d:\d\d:\d\d\.\d{3}\b")
_LOCAL_PORT = re.compile(r"\b(127\.0\.0\.1|localhost):\d+")
_RULE = re.compile(r"[━─]+")
_SECONDS = re.compile(r"\b\d+(?:\.\d+)?s\b")


@dataclass(frozen=True)
class Block:
    """One marked block: its page, the line of its fence, language, name (None: a
    walk-through) and text."""

    page: Path
    line: int
    lang: str
    name: str | None
    body: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(DOCS.parent)}:{self.line}"


@dataclass
class Command:
    """A command of a walk-through and the lines the docs show it printing."""

    argv: list[str]
    shown: list[str] = field(default_factory=list)


def marked_blocks(name: str | None = None) -> list[Block]:
    """The walk-throughs (``name`` None), or the blocks marked ``tested: <name>``, of every
    page, in page and then document order."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in _MARKED.finditer(text):
            if match.group("name") == name:
                line = text.count("\n", 0, match.start()) + 2
                found.append(Block(page, line, match.group("lang"), name, match.group("body")))
    return found


def commands(block: Block) -> list[Command]:
    """The commands of a walk-through block, each split as a shell splits it (comments
    dropped), with the output lines shown after it (``console`` blocks)."""
    result: list[Command] = []
    pending = ""
    for raw in block.body.splitlines():
        line = raw.rstrip()
        if pending:
            pending = pending.removesuffix("\\") + " " + line
        elif block.lang == "console" and not line.startswith("$ "):
            if line.strip() and result:
                result[-1].shown.append(line)
            continue
        elif line.strip() and not line.lstrip().startswith("#"):
            pending = line.removeprefix("$ ")
        if pending and not pending.endswith("\\"):
            result.append(Command(shlex.split(pending, comments=True)))
            pending = ""
    assert not pending, f"{block}: a command ends with a backslash"
    return result


def normalise(text: str) -> str:
    """``text`` with log timestamps, durations (``0.4s``) and local ports replaced, table
    rules shortened and all whitespace (line breaks included) made one space."""
    text = _LOG_TIME.sub("HH:MM:SS.mmm", text)
    text = _SECONDS.sub("Ns", text)
    text = _LOCAL_PORT.sub(r"\1:PORT", text)
    text = _RULE.sub("━", text.replace("─", "━"))
    return " ".join(text.split())


def shows(output: str, documented: str) -> bool:
    """Whether ``output`` holds the documented line, ``...`` in it standing for anything."""
    parts = [re.escape(part.strip()) for part in normalise(documented).split("...")]
    return re.search(r".*?".join(p for p in parts if p), normalise(output)) is not None
