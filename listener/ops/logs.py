"""loguru set-up: human-readable lines on a terminal, JSON lines in containers, all redacted.

Every record passes ``redact_record`` (a loguru patcher): its message and every bound field
go through ``listener.redact.redact_text``, so a URL with credentials, a provider's error body
echoing a key, or a DSN never reaches a sink, whichever sink it is. A patcher cannot reach
the traceback of a logged exception: the sinks installed here redact their whole output line,
which covers it, and never print local variables (``diagnose=False``: loguru would otherwise
show a DSN held in one). A sink added by someone else gets redacted messages and fields.

JSON lines (``LISTENER_LOG_JSON=1``) are flat, one object per line, for log shippers (Loki,
CloudWatch, Datadog) to index without unnesting::

    {"time": "2025-05-01T12:00:00.123Z", "level": "WARNING", "logger": "listener.analysis.dispatch",
     "message": "openai.tier1 failed, retrying in 2.0 s", "job_id": 42, "provider": "openai"}

``time`` is ISO 8601 in UTC with milliseconds; ``logger`` the emitting module; ``exception``
the traceback text when one was logged; every bound field (``job_id``, ``provider``, ``step``,
...) sits at the top level (one named like a standard key gets an ``extra_`` prefix).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import UTC
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

from listener.redact import redact_text

if TYPE_CHECKING:
    from loguru import Message, Record

TEXT_FORMAT = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"
JSON_KEYS = ("time", "level", "logger", "message", "exception")
"""The standard keys of a JSON log line; bound fields sit beside them."""


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


def flat_record(record: Record) -> dict[str, Any]:
    """One log record as the flat JSON object of a log line (see the module docstring).

    Values that JSON cannot hold are written as their ``str``; nothing is redacted here.
    """
    doc: dict[str, Any] = {
        "time": record["time"].astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
        "level": record["level"].name,
        "logger": record["name"],
        "message": record["message"],
    }
    error = record["exception"]
    if error is not None and error.type is not None:
        doc["exception"] = "".join(
            traceback.format_exception(error.type, error.value, error.traceback)
        ).rstrip()
    for key, value in record["extra"].items():
        doc[f"extra_{key}" if key in JSON_KEYS else key] = value
    return doc


class _RedactingSink:
    """Writes log lines to ``stream``, redacted as a whole.

    Text lines are loguru's formatted line through ``redact_text``. JSON lines are
    ``flat_record`` with every string in it redacted (the traceback's text included), written
    as one JSON object, so redaction can never break the JSON.
    """

    def __init__(self, stream: TextIO, json_lines: bool) -> None:
        self._stream = stream
        self._json = json_lines

    def __call__(self, message: Message) -> None:
        if self._json:
            doc = _redact_strings(json.loads(json.dumps(flat_record(message.record), default=str)))
            text = json.dumps(doc, ensure_ascii=False) + "\n"
        else:
            text = redact_text(str(message))
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
    """Send logs to ``stream`` (default stderr) at ``level``; one flat JSON object per line
    when ``json_lines`` (``flat_record``: time, level, logger, message, exception, fields).

    Call once, at process start; it replaces loguru's handlers and installs the redacting
    patcher (``install_redaction``).
    """
    logger.remove()
    install_redaction()
    sink = _RedactingSink(stream or sys.stderr, json_lines)
    if json_lines:
        logger.add(sink, level=level.upper(), format="{message}", diagnose=False)
    else:
        colorize = (stream or sys.stderr).isatty() and "NO_COLOR" not in os.environ
        logger.add(sink, level=level.upper(), format=TEXT_FORMAT, colorize=colorize, diagnose=False)
