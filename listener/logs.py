"""loguru set-up: human-readable lines on a terminal, JSON lines in containers, all redacted.

Every record passes ``redact_record`` (a loguru patcher): its message and every bound field
go through ``listener.redact.redact_text``, so a URL with credentials, a provider's error body
echoing a key, or a DSN never reaches a sink, whichever sink it is. A patcher cannot reach
the traceback of a logged exception: the sinks installed here redact their whole output line,
which covers it, and never print local variables (``diagnose=False``: loguru would otherwise
show a DSN held in one). A sink added by someone else gets redacted messages and fields.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

from listener.redact import redact_text

if TYPE_CHECKING:
    from loguru import Message, Record

TEXT_FORMAT = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"


def redact_record(record: Record) -> None:
    """Redact a log record in place: its message and its bound (``extra``) fields.

    Strings pass ``redact_text``; numbers, booleans and ``None`` are kept; any other value is
    replaced by its redacted ``str`` (a URL object, an exception, a list of URLs).
    """
    record["message"] = redact_text(record["message"])
    extra = record["extra"]
    for key, value in extra.items():
        if isinstance(value, str):
            extra[key] = redact_text(value)
        elif not isinstance(value, bool | int | float | None):
            extra[key] = redact_text(str(value))


def install_redaction() -> None:
    """Make ``redact_record`` loguru's patcher, for every sink (ours and any added later)."""
    logger.configure(patcher=redact_record)


class _RedactingSink:
    """Writes loguru's formatted lines to ``stream``, redacted as a whole.

    For JSON lines (``serialize=True``) the line is parsed, every string in it redacted, and
    written back as one JSON object, so redaction can never break the JSON.
    """

    def __init__(self, stream: TextIO, json_lines: bool) -> None:
        self._stream = stream
        self._json = json_lines

    def __call__(self, message: Message) -> None:
        text = str(message)
        if self._json:
            doc = _redact_strings(json.loads(text))
            text = json.dumps(doc, default=str, ensure_ascii=False) + "\n"
        else:
            text = redact_text(text)
        self._stream.write(text)
        self._stream.flush()


def _redact_strings(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: _redact_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_strings(item) for item in value]
    return value


def configure_logging(
    level: str = "INFO", json_lines: bool = False, stream: TextIO | None = None
) -> None:
    """Send logs to ``stream`` (default stderr) at ``level``; one JSON object per line when
    ``json_lines`` (loguru's ``serialize`` shape: ``{"text": ..., "record": {...}}``).

    Call once, at process start; it replaces loguru's handlers and installs the redacting
    patcher (``install_redaction``).
    """
    logger.remove()
    install_redaction()
    sink = _RedactingSink(stream or sys.stderr, json_lines)
    if json_lines:
        logger.add(sink, level=level.upper(), serialize=True, enqueue=False, diagnose=False)
    else:
        colorize = (stream or sys.stderr).isatty() and "NO_COLOR" not in os.environ
        logger.add(sink, level=level.upper(), format=TEXT_FORMAT, colorize=colorize, diagnose=False)
