"""What a scrape's request chooses (its headers, its ``name[]``), on both ways of serving
/metrics (the standalone server and the route on an app), as a client sees it."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text
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


def _families(response: httpx.Response) -> list[str]:
    assert response.status_code == 200
    return [family.name for family in parse_text(response.text)]


@pytest.mark.parametrize("serving", ["standalone", "app route"])
def test_name_filters_give_only_the_families_named(serving):
    """``?name[]=...`` as prometheus_client's /metrics takes it (a family's or a sample's name):
    the whole scrape came back, whatever was asked."""
    telemetry = Telemetry(load_settings({}), service="gateway")
    telemetry.traffic.session_created()
    query = "?name[]=sessions_created_total&name[]=http_server_request_duration_seconds_count&name[]=target_info"
    try:
        if serving == "standalone":
            server = MetricsServer(telemetry.scrape, host="127.0.0.1", port=0)
            try:
                named = httpx.get(server.url + query, timeout=5)
                everything = httpx.get(server.url, timeout=5)
                nothing_known = httpx.get(server.url + "?name[]=no_such_metric", timeout=5)
            finally:
                server.stop()
        else:
            app = Starlette()
            mount_metrics_route(app, "/metrics", telemetry.scrape)

            async def scrapes() -> list[httpx.Response]:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
                    return [await client.get(f"/metrics{q}") for q in (query, "", "?name[]=no_such_metric")]

            named, everything, nothing_known = asyncio.run(scrapes())
    finally:
        telemetry.shutdown()
    # prometheus_client's parser names a counter's family without `_total`.
    assert sorted(_families(named)) == ["http_server_request_duration_seconds", "sessions_created", "target_info"]
    assert len(_families(everything)) > 10
    assert _families(nothing_known) == []
