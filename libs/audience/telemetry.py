"""OpenTelemetry set up from configuration, trace context through the bus, and logging.

One :func:`setup_telemetry` per process: it makes the tracer and meter providers, installs
them as the global ones (for libraries that trace on their own) and hands out the gRPC
interceptors. The services take their tracers and meters from the process's
:class:`Telemetry` (``resources.telemetry.tracer(__name__)``), never from the globals, so
a process can host services with telemetry of its own making (a test's in-memory
exporter: :meth:`Telemetry.recording`). With ``AUDIENCE_OTEL=off`` nothing is installed
and there are no interceptors, so a call costs nothing beyond OpenTelemetry's no-op tracer.

Bus messages carry W3C trace context: the producer stores :func:`inject` in the message
headers and the consumer opens :func:`consumer_span` with them, so one trace follows an
event from ingest through profile to segment_engine.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_name
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.util.types import Attributes

from audience.config import LogFormat, LogLevel, OtelMode

__all__ = [
    "Telemetry",
    "configure_logging",
    "consumer_span",
    "extract",
    "inject",
    "setup_telemetry",
]

# Probes and reflection would drown the real traffic in spans.
_UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


@dataclass(frozen=True)
class Telemetry:
    """The process's telemetry; without a tracer provider nothing is recorded."""

    service_name: str
    mode: OtelMode
    tracer_provider: TracerProvider | None = field(default=None, repr=False)
    meter_provider: MeterProvider | None = field(default=None, repr=False)

    @classmethod
    def recording(
        cls,
        service: str,
        mode: OtelMode,
        *,
        span_processors: Sequence[SpanProcessor],
        metric_readers: Sequence[MetricReader],
    ) -> Telemetry:
        """Providers that hand spans to ``span_processors`` and metrics to
        ``metric_readers``, installed nowhere: what :func:`setup_telemetry` makes before
        installing them, or a test's telemetry (an in-memory exporter and reader)."""
        return cls(service, mode, *_providers(service, span_processors, metric_readers))

    def tracer(self, name: str) -> trace.Tracer:
        """The tracer of module ``name``; OpenTelemetry's no-op tracer when off."""
        if self.tracer_provider is None:
            return trace.NoOpTracer()
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        """The meter of module ``name``; OpenTelemetry's no-op meter when off."""
        if self.meter_provider is None:
            return metrics.NoOpMeter(name)
        return self.meter_provider.get_meter(name)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors that open a server span per RPC (none when off)."""
        if self.tracer_provider is None:
            return []
        untraced = negate(any_of(*(service_name(name) for name in _UNTRACED_SERVICES)))
        interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.tracer_provider, filter_=untraced
        )
        return [interceptor]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Interceptors for ``grpc.aio`` channels that open a client span and send the
        trace context (none when off)."""
        if self.tracer_provider is None:
            return []
        interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
            tracer_provider=self.tracer_provider
        )
        return interceptors

    def shutdown(self) -> None:
        """Flushes what is buffered and stops the exporters."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def setup_telemetry(service: str, mode: OtelMode, endpoint: str | None = None) -> Telemetry:
    """Installs the global providers for ``mode``; call once per process.

    Args:
        service: the ``service.name`` resource attribute (``audience`` for the whole suite in
            one process, ``audience-ingest`` for ingest alone).
        mode: ``off``, ``console`` (spans and metrics printed to stdout) or ``otlp``.
        endpoint: the OTLP gRPC endpoint; ``None`` leaves it to the exporter
            (``OTEL_EXPORTER_OTLP_ENDPOINT``, else ``localhost:4317``).
    """
    if mode == "off":
        return Telemetry(service_name=service, mode=mode)
    span_exporter: SpanExporter
    metric_exporter: MetricExporter
    if mode == "console":
        span_exporter = ConsoleSpanExporter()
        metric_exporter = ConsoleMetricExporter()
    else:
        span_exporter = OTLPSpanExporter(endpoint=endpoint)
        metric_exporter = OTLPMetricExporter(endpoint=endpoint)
    tracer_provider, meter_provider = _providers(
        service,
        [BatchSpanProcessor(span_exporter)],
        [PeriodicExportingMetricReader(metric_exporter)],
    )
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(service, mode, tracer_provider, meter_provider)


def _providers(
    service: str,
    span_processors: Sequence[SpanProcessor],
    metric_readers: Sequence[MetricReader],
) -> tuple[TracerProvider, MeterProvider]:
    resource = Resource.create({SERVICE_NAME: service})
    tracer_provider = TracerProvider(resource=resource)
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider(resource=resource, metric_readers=list(metric_readers))
    return tracer_provider, meter_provider


def inject(context: otel_context.Context | None = None) -> dict[str, str]:
    """Returns the headers (``traceparent``, ``tracestate``) that carry the current trace;
    empty when nothing is being traced."""
    headers: dict[str, str] = {}
    propagate.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """Returns the context that :func:`inject` stored in ``headers``."""
    return propagate.extract(headers)


@contextmanager
def consumer_span(
    name: str,
    headers: Mapping[str, str],
    *,
    tracer: trace.Tracer,
    linked: Iterable[Mapping[str, str]] = (),
    attributes: Attributes = None,
) -> Iterator[trace.Span]:
    """Opens the current span for handling a bus message, as a child of its producer.

    Args:
        name: the span name, e.g. ``"profile consume events"``.
        headers: the message's trace headers; the span joins the producer's trace.
        tracer: the consuming service's (``Telemetry.tracer``).
        linked: headers of the other messages handled in the same span (a batch); each
            becomes a span link, so their traces lead here too.
        attributes: span attributes such as ``messaging.destination.name``.
    """
    links = [
        trace.Link(context)
        for context in (
            trace.get_current_span(extract(other)).get_span_context() for other in linked
        )
        if context.is_valid
    ]
    with tracer.start_as_current_span(
        name,
        context=extract(headers),
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
    ) as span:
        yield span


class _TraceIds(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, empty outside a span) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = trace.format_trace_id(span_context.trace_id)
            record.span_id = trace.format_span_id(span_context.span_id)
        else:
            record.trace_id = record.span_id = ""
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id: str = getattr(record, "trace_id", "")
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = getattr(record, "span_id", "")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        trace_id: str = getattr(record, "trace_id", "")
        if not trace_id:
            return line
        return f"{line} trace_id={trace_id} span_id={getattr(record, 'span_id', '')}"


def configure_logging(level: LogLevel, fmt: LogFormat) -> logging.Handler:
    """Sends every log record to stderr, with its trace and span ids, as text or JSON lines.

    Replaces the handler of an earlier call, so calling it again changes the setup.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceIds())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.set_name("audience")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "audience":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
