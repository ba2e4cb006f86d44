from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from audience.telemetry import configure_logging, consumer_span, inject, setup_telemetry


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> trace.Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


def test_a_message_keeps_its_trace_from_producer_to_consumer(
    tracer: trace.Tracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("ingest append") as producer:
        headers = inject()
    with consumer_span("profile consume", headers, tracer=tracer) as consumer:
        pass

    assert set(headers) >= {"traceparent"}
    producer_context = producer.get_span_context()
    assert consumer.get_span_context().trace_id == producer_context.trace_id
    finished = {span.name: span for span in exporter.get_finished_spans()}
    consumed = finished["profile consume"]
    assert consumed.kind == trace.SpanKind.CONSUMER
    assert consumed.parent is not None
    assert consumed.parent.span_id == producer_context.span_id


def test_a_batch_links_the_other_messages_traces(
    tracer: trace.Tracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("first"):
        first = inject()
    with tracer.start_as_current_span("second") as second:
        other = inject()
    with consumer_span("consume batch", first, linked=[other, {}], tracer=tracer):
        pass

    consumed = next(s for s in exporter.get_finished_spans() if s.name == "consume batch")
    assert [link.context.span_id for link in consumed.links] == [second.get_span_context().span_id]


def test_nothing_is_injected_outside_a_trace() -> None:
    assert inject() == {}


def test_off_installs_nothing() -> None:
    before = trace.get_tracer_provider()

    telemetry = setup_telemetry("audience-test", "off")

    assert telemetry.server_interceptors() == []
    assert telemetry.client_interceptors() == []
    assert trace.get_tracer_provider() is before
    telemetry.shutdown()


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_json_log_lines_carry_the_trace_id(
    tracer: trace.Tracer, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    log = logging.getLogger("audience.test")

    with tracer.start_as_current_span("work") as span:
        log.info("inside %s", "span")
    log.info("outside")
    log.debug("too detailed")

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == ["inside span", "outside"]
    assert lines[0]["trace_id"] == trace.format_trace_id(span.get_span_context().trace_id)
    assert lines[0]["span_id"] == trace.format_span_id(span.get_span_context().span_id)
    assert "trace_id" not in lines[1]


@pytest.mark.usefixtures("root_logging")
def test_configuring_text_logging_again_replaces_the_handler(
    tracer: trace.Tracer, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    configure_logging("warning", "text")

    with tracer.start_as_current_span("work") as span:
        logging.getLogger("audience.test").warning("careful")

    (line,) = capsys.readouterr().err.splitlines()
    trace_id = trace.format_trace_id(span.get_span_context().trace_id)
    assert line.endswith(
        f"WARNING audience.test: careful trace_id={trace_id} span_id="
        + trace.format_span_id(span.get_span_context().span_id)
    )
