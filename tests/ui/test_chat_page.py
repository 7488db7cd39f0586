"""The chat page in a real browser (Debian Chromium driven by Playwright): what a person sees."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.chat_client import eventually
from tests.metrics_text import value

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without these, Chromium tries the network at start, and this machine's network refuses it.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which("chromium"):
        pytest.fail("chromium not found: install the Debian package `chromium` (.ci/run does)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_chat_page_streams_a_reply_and_counts_the_sse_client(pipeline, browser, tmp_path):
    gateway_metrics = pipeline.metrics_urls["gateway"]

    def sse_clients() -> float:
        return value(httpx.get(gateway_metrics, timeout=5).text, "sse_clients_gauge")

    eventually(lambda: sse_clients() == 0, what="no SSE client before the page opens")
    page = browser.new_page()
    page.goto(f"{pipeline.gateway_url}/")
    page.click("#new-session")
    page.wait_for_selector("#status[data-ready='1']")
    eventually(lambda: sse_clients() == 1, what="the page's stream is counted")

    page.fill("#message", "hello from the browser")
    page.click("#send")
    reply = page.wait_for_selector(".assistant.done", timeout=30_000)
    assert reply.text_content().startswith("You said: hello from the browser.")
    assert page.locator(".turn.user").first.text_content() == "hello from the browser"
    page.screenshot(path=str(tmp_path / "chat.png"))

    page.close()
    eventually(lambda: sse_clients() == 0, what="the stream ends when the page closes")


def test_chat_page_sends_from_a_plain_http_address_too(pipeline, browser):
    # crypto.randomUUID exists only in secure contexts: opened at http://<a LAN address>, the
    # page threw before sending. Taken away here, as such an address would.
    page = browser.new_page()
    page.add_init_script("delete Crypto.prototype.randomUUID")
    page.goto(f"{pipeline.gateway_url}/")
    assert page.evaluate("typeof crypto.randomUUID") == "undefined"
    page.click("#new-session")
    page.wait_for_selector("#status[data-ready='1']")
    page.fill("#message", "hello without randomUUID")
    page.click("#send")
    reply = page.wait_for_selector(".assistant.done", timeout=30_000)
    assert reply.text_content().startswith("You said: hello without randomUUID.")
    page.close()


def test_chat_page_opens_its_stream_once_the_gateway_has_room_again(start_gateway, browser):
    """A gateway with room for one stream, taken by another client: the page's EventSource is
    refused (503), which EventSource never retries by itself; the page must, and opens its
    stream once the other client leaves."""
    gateway = start_gateway(CHATPIPE_SSE_MAX_STREAMS="1").base_url
    other = httpx.post(f"{gateway}/v1/sessions", headers={"X-Tenant-ID": "acme"}).json()["session_id"]
    page = browser.new_page()
    with httpx.Client(timeout=10) as client, client.stream("GET", f"{gateway}/v1/sessions/{other}/events") as taken:
        lines = taken.iter_lines()
        assert next(lines) == ": connected"
        page.goto(f"{gateway}/")
        page.click("#new-session")
        page.wait_for_selector("#status:has-text('no event stream, trying again')", timeout=10_000)
        assert page.locator("#status[data-ready='1']").count() == 0
    page.wait_for_selector("#status[data-ready='1']", timeout=20_000)
    assert value(httpx.get(f"{gateway}/metrics", timeout=5).text, "sse_clients_gauge") == 1
    page.close()


def test_chat_page_stops_trying_a_session_deleted_elsewhere(start_gateway, browser):
    """The page's stream ends (idle for the gateway's timeout) and its session is gone by then,
    deleted from another tab: the page says so and stops, instead of asking for its stream
    again every few seconds for as long as it stays open."""
    gateway = start_gateway(CHATPIPE_SSE_TIMEOUT_SECONDS="1").base_url

    def stream_requests() -> float:
        return value(httpx.get(f"{gateway}/metrics", timeout=5).text, "http_server_request_duration_seconds_count",
                     http_route="/v1/sessions/{session_id}/events")  # fmt: skip

    page = browser.new_page()
    page.goto(f"{gateway}/")
    page.click("#new-session")
    page.wait_for_selector("#status[data-ready='1']")
    session = page.locator("#status").get_attribute("data-session")
    assert httpx.delete(f"{gateway}/v1/sessions/{session}", timeout=10).status_code == 204
    page.wait_for_selector("#status:has-text('was deleted')", timeout=15_000)
    assert page.locator("#send").is_disabled()
    asked = stream_requests()
    page.wait_for_timeout(5_000)  # the page tried again from 1 s, doubling: three tries at least
    assert stream_requests() == asked, "the page still asks for a deleted session's stream"
    page.close()
