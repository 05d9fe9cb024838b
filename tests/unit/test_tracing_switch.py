"""When traces are on (``listener.ops.tracing``), and that off costs no OpenTelemetry import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from listener.ops.otel import OtelTracing
from listener.ops.tracing import Tracing, build_tracing, tracing_requested


@pytest.mark.parametrize(
    ("environ", "listener_otel", "on"),
    [
        ({}, None, False),
        ({}, True, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, None, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, None, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, None, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False, False),
        ({"OTEL_SDK_DISABLED": "true"}, True, False),
    ],
)
def test_what_turns_traces_on(
    environ: dict[str, str], listener_otel: bool | None, on: bool
) -> None:
    assert tracing_requested(environ, listener_otel) is on


def test_exporters_follow_the_standard_variables() -> None:
    tracing = build_tracing({"OTEL_TRACES_EXPORTER": "console"}, None)
    assert isinstance(tracing, OtelTracing) and tracing.enabled
    tracing.shutdown()
    with pytest.raises(ValueError, match="zipkin"):
        build_tracing({"OTEL_TRACES_EXPORTER": "zipkin"}, None)
    with pytest.raises(ValueError, match="http/json"):
        build_tracing({"LISTENER_OTEL": "1", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, True)
    off = build_tracing({}, None)
    assert type(off) is Tracing and not off.enabled and off.headers() == {}


def test_off_imports_nothing_of_opentelemetry() -> None:
    code = (
        "import os, sys\n"
        "import listener.app, listener.analysis.dispatch, listener.analysis.providers.openai\n"
        "from listener.ops.tracing import build_tracing\n"
        "tracing = build_tracing(os.environ, None)\n"
        "with tracing.span('listener.job', {'listener.job.id': 1}) as span:\n"
        "    span.set('listener.job.outcome', 'completed')\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
