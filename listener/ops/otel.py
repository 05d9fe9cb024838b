"""OpenTelemetry implementation of ``listener.ops.tracing.Tracing`` (the ``otel`` extra).

Imported only when tracing is on (``listener.ops.tracing.build_tracing``). The exporter follows
the standard environment variables of the OpenTelemetry specification ("SDK Environment
Variables", "OTLP Exporter Configuration"):

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (the default), ``console`` (spans as JSON on stdout), or
  both, comma-separated.
- ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``
  (the default the specification recommends; port 4318) or ``grpc`` (port 4317).
- ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._TRACES_ENDPOINT``, ``..._HEADERS``, ``..._TIMEOUT``,
  ``..._CERTIFICATE``: read by the exporter itself.
- ``OTEL_SERVICE_NAME`` (default ``listener``), ``OTEL_RESOURCE_ATTRIBUTES``: the resource.
- ``OTEL_BSP_*``: the batch span processor's queue and delays; ``OTEL_TRACES_SAMPLER`` and
  ``OTEL_PROPAGATORS`` (default W3C ``tracecontext,baggage``) as the SDK reads them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Status, StatusCode

from listener.ops.tracing import AttributeValue, Span, Tracing
from listener.redact import redact_text

INSTRUMENTATION_NAME = "listener"


class _OtelSpan(Span):
    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set(self, key: str, value: AttributeValue | None) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def fail(self, description: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, redact_text(description)))


class OtelTracing(Tracing):
    """Spans from ``provider``'s tracer; ``shutdown`` flushes and stops ``provider``.

    The provider is this object's own (never installed as OpenTelemetry's global one), so
    tests can give theirs (an ``InMemorySpanExporter`` behind a ``SimpleSpanProcessor``).
    """

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> OtelTracing:
        """A provider with the exporters the ``OTEL_*`` variables ask for (module docstring).

        Raises:
            ValueError: an unknown exporter or protocol.
        """
        named = "OTEL_SERVICE_NAME" in environ or "service.name=" in environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        resource = Resource.create({} if named else {"service.name": "listener"})
        provider = TracerProvider(resource=resource)
        for exporter in _exporters(environ):
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    @contextmanager
    def span(self, name: str, attributes: Mapping[str, AttributeValue | None]) -> Iterator[Span]:
        """See ``Tracing.span``. An exception is recorded as an ``exception`` event with its
        type and redacted message (no stack trace), and fails the span."""
        kept = {key: value for key, value in attributes.items() if value is not None}
        with self._tracer.start_as_current_span(
            name, attributes=kept, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield _OtelSpan(span)
            except BaseException as error:
                message = redact_text(str(error))
                span.add_event(
                    "exception",
                    {"exception.type": type(error).__qualname__, "exception.message": message},
                )
                span.set_status(Status(StatusCode.ERROR, message))
                raise

    def headers(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    def shutdown(self) -> None:
        self._provider.shutdown()


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp(environ))
        else:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none"
            )
    return exporters


def _otlp(environ: Mapping[str, str]) -> SpanExporter:
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(f"OTLP protocol {protocol!r} is not supported: use http/protobuf or grpc")
