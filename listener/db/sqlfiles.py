"""Locating and parsing the SQL files under ``sql/``.

In a source checkout (and an editable install) the files live in ``sql/`` beside the
package; a built wheel carries them as ``listener/sql/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*:(\w+)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class NamedQuery:
    """One query of ``sql/queries.sql``.

    Attributes:
        name: the name after ``-- name:``.
        kind: ``one`` (one row), ``many`` (rows) or ``execute`` (status only).
        sql: the statement text, comments included.
    """

    name: str
    kind: str
    sql: str


def sql_dir() -> Path:
    """The directory holding ``migrations/`` and ``queries.sql``.

    Raises:
        FileNotFoundError: neither the packaged nor the checkout location exists.
    """
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "queries.sql").is_file():
            return candidate
    raise FileNotFoundError(f"listener's sql/ directory not found near {here}")


def parse_named_queries(text: str) -> dict[str, NamedQuery]:
    """Split a file of ``-- name: NAME :KIND`` blocks into queries.

    Raises:
        ValueError: a name appears twice or a kind is unknown.
    """
    queries: dict[str, NamedQuery] = {}
    headers = list(_HEADER.finditer(text))
    for i, match in enumerate(headers):
        name, kind = match.group(1), match.group(2)
        if kind not in ("one", "many", "execute"):
            raise ValueError(f"query {name}: unknown kind {kind!r}")
        if name in queries:
            raise ValueError(f"query {name} is defined twice")
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = text[match.end() : end].strip().rstrip(";")
        queries[name] = NamedQuery(name=name, kind=kind, sql=body)
    return queries
