"""OpenTelemetry traces of jobs, when the ``otel`` extra is installed and asked for.

Every job the daemon runs is one trace::

    listener.job                      job id, table, attempt, outcome
    ├── listener.fetch                the image download (redacted URL, bytes)
    ├── listener.step local.analysis  provider, step, cost, tokens
    └── listener.step openai.tier1    ─► the OpenAI request carries ``traceparent``

The provider calls carry the W3C ``traceparent`` header of their step's span (OpenAI through
the SDK's ``extra_headers``, Rekognition through botocore's ``before-send`` event), so a proxy
or gateway that traces requests joins the same trace.

Turned on by (``build_tracing``), in this order:

- ``OTEL_SDK_DISABLED=true``: off, whatever else is set (the OpenTelemetry standard variable).
- ``LISTENER_OTEL=1`` / ``0``: on / off.
- otherwise on when ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
  ``OTEL_TRACES_EXPORTER`` (other than ``none``) is set.

Asked for without ``pip install 'listener[otel]'``, the daemon logs a warning and runs without
traces. Off, nothing of OpenTelemetry is imported and a span costs one no-op context manager.
The exporter follows the standard variables (``listener.ops.otel``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TypeAlias

from loguru import logger

AttributeValue: TypeAlias = str | bool | int | float
"""A span attribute's value (OpenTelemetry's primitive attribute types)."""


class Span:
    """One span as the pipeline sees it: attributes can be added, a failure recorded.

    The base class does nothing: it is the span of ``Tracing`` while tracing is off.
    """

    def set(self, key: str, value: AttributeValue | None) -> None:
        """Set attribute ``key`` (``None`` is skipped)."""

    def fail(self, description: str) -> None:
        """Mark the span as failed (status ERROR) with ``description``."""


_NO_SPAN = Span()


class Tracing:
    """Spans and trace headers; this base class is tracing switched off (no-op, no imports).

    ``listener.ops.otel.OtelTracing`` is the OpenTelemetry implementation.
    """

    enabled = False

    @contextmanager
    def span(self, name: str, attributes: Mapping[str, AttributeValue | None]) -> Iterator[Span]:
        """A child span of the current one (a new trace when there is none), current inside.

        An exception leaving the block is recorded on the span, which is then failed.
        """
        yield _NO_SPAN

    def headers(self) -> dict[str, str]:
        """The trace context headers (``traceparent``, ...) of the current span; ``{}`` off."""
        return {}

    def shutdown(self) -> None:
        """Export what is buffered and stop exporting."""


def tracing_requested(environ: Mapping[str, str], listener_otel: bool | None) -> bool:
    """Whether the environment asks for traces (see the module docstring for the rules).

    Args:
        environ: the process environment.
        listener_otel: ``LISTENER_OTEL`` as read by the settings (``None``: unset).
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if listener_otel is not None:
        return listener_otel
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or (exporters and exporters != "none")
    )


def build_tracing(environ: Mapping[str, str], listener_otel: bool | None) -> Tracing:
    """The daemon's ``Tracing``: OpenTelemetry's when requested and installed, else no-op.

    Raises:
        ValueError: ``OTEL_TRACES_EXPORTER`` names an exporter listener cannot build.
    """
    if not tracing_requested(environ, listener_otel):
        return Tracing()
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        logger.warning(
            "traces were asked for (LISTENER_OTEL or OTEL_* variables) but OpenTelemetry is not "
            "installed: pip install 'listener[otel]'; running without traces"
        )
        return Tracing()
    from listener.ops.otel import OtelTracing

    return OtelTracing.from_environment(environ)
