"""listener: a Postgres-backed daemon that guarantees AI analysis of every inserted image row."""

from __future__ import annotations

__version__ = "0.1.0"
