"""The OTLP headers a collector receives: what the ``OTEL_EXPORTER_OTLP_*HEADERS`` variables say.

A real gRPC receiver (the OTLP trace service, in this process) records each export's metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from chatobs import Telemetry, load_settings


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def Export(self, request, context):  # noqa: N802 - the generated service's name
        self.metadata.append(dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[str, _Receiver]]:
    service = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", service
    server.stop(0)


def _one_span_exported(endpoint: str, **headers: str) -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TIMEOUT": "5000",
           "OTEL_METRICS_EXPORTER": "none", **headers}  # fmt: skip
    telemetry = Telemetry(load_settings(env), service="worker")
    try:
        with telemetry.tracer.start_as_current_span("turn"):
            pass
        assert telemetry.force_flush(), "the export failed"
    finally:
        telemetry.shutdown()


def test_a_capitalised_header_name_reaches_a_grpc_collector(receiver):
    endpoint, service = receiver
    # gRPC refuses metadata keys with capitals: passed on as written, every push failed.
    _one_span_exported(endpoint, OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer%20abc,X-Tenant=acme")
    assert service.metadata, "nothing was exported"
    assert service.metadata[-1]["authorization"] == "Bearer abc"
    assert service.metadata[-1]["x-tenant"] == "acme"


def test_the_signals_own_headers_replace_the_generic_ones(receiver):
    endpoint, service = receiver
    _one_span_exported(
        endpoint,
        OTEL_EXPORTER_OTLP_HEADERS="x-tenant=generic,x-only-generic=1",
        OTEL_EXPORTER_OTLP_TRACES_HEADERS="x-tenant=traces",
    )
    assert service.metadata[-1]["x-tenant"] == "traces"
    assert "x-only-generic" not in service.metadata[-1], "the specification: replaced, not merged"
