"""loguru set-up: human-readable lines on a terminal, JSON lines in containers."""

from __future__ import annotations

import sys

from loguru import logger


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Send logs to stderr at ``level``; one JSON object per line when ``json_lines``.

    Call once, at process start; it replaces loguru's default handler.
    """
    logger.remove()
    if json_lines:
        logger.add(sys.stderr, level=level.upper(), serialize=True, enqueue=False)
    else:
        logger.add(
            sys.stderr,
            level=level.upper(),
            format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
        )
