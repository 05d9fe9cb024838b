"""Printing data that came from users or remote servers on the operator's terminal.

Owner ids, table names, URLs and error texts are data: printed through Rich as they are, a
``[/]`` in one crashes the command (a markup error), ``[bold green]ALL OK[/]`` is rendered as
markup, and escape sequences (``ESC ] 0 ; title BEL`` sets the window title, OSC 8 makes
hyperlinks, CSI sequences move the cursor or clear the screen) reach the terminal. ``shown``
is the one helper every CLI output of such data goes through.
"""

from __future__ import annotations

import unicodedata

from rich.markup import escape

from listener.redact import redact_text

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
