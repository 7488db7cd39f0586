"""A minimal OTLP/HTTP receiver for tests, metrics and traces (no collector binary is available here)."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class OtlpReceiver:
    def __init__(self) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        self.trace_requests: list[ExportTraceServiceRequest] = []
        #: Every request's path as sent, query included.
        self.paths: list[str] = []
        self.received = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.paths.append(self.path)
                path = self.path.partition("?")[0]  # a base URL may carry a path prefix and a query
                if path.endswith("/v1/metrics"):
                    request = ExportMetricsServiceRequest()
                    request.ParseFromString(body)
                    with receiver._lock:
                        receiver.requests.append(request)
                    receiver.received.set()
                elif path.endswith("/v1/traces"):
                    spans = ExportTraceServiceRequest()
                    spans.ParseFromString(body)
                    with receiver._lock:
                        receiver.trace_requests.append(spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def metrics(self) -> dict[str, object]:
        """{metric name: otlp Metric} over every request received."""
        return {
            metric.name: metric
            for request in self.requests
            for resource_metrics in request.resource_metrics
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
        }

    def resource_attributes(self) -> dict[str, str]:
        return {
            attribute.key: attribute.value.string_value
            for request in self.requests
            for resource_metrics in request.resource_metrics
            for attribute in resource_metrics.resource.attributes
        }

    def pushes_by_service(self) -> Counter[str]:
        """How many metric pushes arrived from each ``service.name``."""
        with self._lock:
            requests = list(self.requests)
        return Counter(
            _service(resource_metrics.resource) for request in requests for resource_metrics in request.resource_metrics
        )

    def spans_by_service(self) -> Counter[str]:
        """How many spans arrived from each ``service.name``."""
        with self._lock:
            requests = list(self.trace_requests)
        counts: Counter[str] = Counter()
        for request in requests:
            for resource_spans in request.resource_spans:
                service = _service(resource_spans.resource)
                counts[service] += sum(len(scope.spans) for scope in resource_spans.scope_spans)
        return counts

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _service(resource: object) -> str:
    for attribute in resource.attributes:  # type: ignore[attr-defined]
        if attribute.key == "service.name":
            return attribute.value.string_value
    return ""
