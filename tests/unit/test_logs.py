"""JSON log lines (``LISTENER_LOG_JSON=1``): one flat object per line."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta, timezone

from loguru import logger

from listener.ops.logs import configure_logging


def test_json_log_lines_are_flat() -> None:
    """One flat object per line: time (UTC), level, logger, message, exception, bound fields."""
    stream = io.StringIO()
    configure_logging("DEBUG", json_lines=True, stream=stream)
    try:
        log = logger.bind(job_id=42, provider="openai", step="openai.tier1", level="custom")
        log.warning("step failed, retrying in {} s", 2.0)
        log.bind(when=datetime(2025, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))).debug(
            "plain"
        )
        try:
            raise RuntimeError("provider unavailable")
        except RuntimeError:
            log.exception("gave up")
    finally:
        configure_logging("INFO")
    text = stream.getvalue()
    assert text.endswith("\n") and len(text.splitlines()) == 3
    first, second, third = (json.loads(line) for line in text.splitlines())
    assert first == {
        "time": first["time"],
        "level": "WARNING",
        "logger": __name__,
        "message": "step failed, retrying in 2.0 s",
        "job_id": 42,
        "provider": "openai",
        "step": "openai.tier1",
        "extra_level": "custom",  # a bound field never overwrites a standard key
    }
    stamp = datetime.fromisoformat(first["time"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert second["level"] == "DEBUG" and second["when"] == "2025-05-01 14:00:00+02:00"
    assert "exception" not in first and "exception" not in second
    assert third["level"] == "ERROR" and third["message"] == "gave up"
    assert third["exception"].startswith("Traceback (most recent call last):")
    assert third["exception"].endswith("RuntimeError: provider unavailable")
