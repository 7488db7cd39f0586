"""What a scrape's request headers choose, on both ways of serving /metrics (the standalone
server and the route on an app), as a client sees it."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette

from chatobs import Telemetry, load_settings
from chatobs.server import MetricsServer, mount_metrics_route

_REPEATED = [("Accept", "text/plain;q=0.1"), ("Accept", "application/openmetrics-text"),
             ("Accept-Encoding", "identity"), ("Accept-Encoding", "gzip")]  # fmt: skip


def _assert_openmetrics_gzipped(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text"), response.headers
    assert response.headers["content-encoding"] == "gzip"
    assert response.text.endswith("# EOF\n")  # httpx decodes the gzip


def test_repeated_accept_lines_are_one_list_on_the_standalone_server():
    """Accept, and Accept-Encoding, sent as two lines are one list (RFC 9110 5.3), as
    prometheus_client reads them: only the first line counted, so the text format came uncompressed."""
    telemetry = Telemetry(load_settings({}), service="gateway")
    server = MetricsServer(telemetry.scrape, host="127.0.0.1", port=0)
    try:
        _assert_openmetrics_gzipped(httpx.get(server.url, headers=_REPEATED, timeout=5))
    finally:
        server.stop()
        telemetry.shutdown()


def test_repeated_accept_lines_are_one_list_on_the_app_route():
    telemetry = Telemetry(load_settings({}), service="gateway")
    app = Starlette()
    mount_metrics_route(app, "/metrics", telemetry.scrape)

    async def scrape() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.get("/metrics", headers=_REPEATED)

    try:
        _assert_openmetrics_gzipped(asyncio.run(scrape()))
    finally:
        telemetry.shutdown()
