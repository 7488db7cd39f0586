"""An OTLP/HTTP receiver that takes every export and keeps nothing, in this process: what a
service pays to ship its spans and metrics when a collector takes them.

    with discarding_receiver() as env:   # env: the OTEL_* variables that point a service at it
        ...
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Discard(BaseHTTPRequestHandler):
    """Reads the export, answers 200 with an empty body."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a collector's receiver

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def discarding_receiver(metrics: bool = False) -> Iterator[dict[str, str]]:
    """A service's environment for exporting every span over OTLP/HTTP to the receiver (and,
    with ``metrics``, pushing its metrics there too, beside the ``/metrics`` scrape)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{base}/v1/traces"}
    if metrics:
        env |= {"OTEL_METRICS_EXPORTER": "prometheus,otlp", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{base}/v1/metrics"}
    try:
        yield env
    finally:
        server.shutdown()
        server.server_close()


__all__ = ["discarding_receiver"]
