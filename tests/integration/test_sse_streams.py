"""The gateway holds at most ``CHATPIPE_SSE_MAX_STREAMS`` event streams open at once.

Each stream holds a Redis pub/sub connection for as long as it lasts. Past the cap a client is
told to come back (503, ``Retry-After``); a stream that ends, however it ends (the client
closed it, or left before the response began), gives its place back.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.chat_client import eventually
from tests.metrics_text import value

CAP = 2


@pytest.fixture
def gateway(start_gateway) -> str:  # type: ignore[no-untyped-def]
    return start_gateway(CHATPIPE_SSE_MAX_STREAMS=str(CAP)).base_url


def new_session(gateway: str) -> str:
    return httpx.post(f"{gateway}/v1/sessions", headers={"X-Tenant-ID": "acme"}, timeout=5).json()["session_id"]


@contextlib.contextmanager
def opened(client: httpx.Client, gateway: str, session: str) -> Iterator[httpx.Response]:
    """An event stream, read up to its first comment when the gateway accepted it."""
    with client.stream("GET", f"{gateway}/v1/sessions/{session}/events") as response:
        # The line iterator is kept while the stream is used: once collected, it closes the stream.
        lines = response.iter_lines() if response.status_code == 200 else None
        if lines is not None:
            assert next(lines) == ": connected"
        else:
            response.read()
        yield response


def streams_gauge(gateway: str) -> float:
    return value(httpx.get(f"{gateway}/metrics", timeout=5).text, "sse_clients_gauge")


def test_a_stream_past_the_cap_is_refused_with_retry_after_until_one_ends(gateway):
    session = new_session(gateway)
    with httpx.Client(timeout=10) as first, httpx.Client(timeout=10) as second, httpx.Client(timeout=10) as third:
        with opened(first, gateway, session) as one, opened(second, gateway, session) as two:
            assert (one.status_code, two.status_code) == (200, 200)
            with opened(third, gateway, session) as refused:
                assert refused.status_code == 503
                assert refused.headers["retry-after"].isdigit()
                assert f"{CAP} event streams are open" in refused.json()["error"]
            assert streams_gauge(gateway) == CAP
        # Both closed by their clients: their places are free again.
        eventually(lambda: streams_gauge(gateway) == 0, what="both streams ended")
        with opened(first, gateway, session) as again, opened(second, gateway, session) as also:
            assert (again.status_code, also.status_code) == (200, 200)


def test_clients_gone_before_their_stream_began_give_their_places_back(gateway):
    session = new_session(gateway)
    address = urlsplit(gateway)
    for _ in range(3 * CAP):  # each asks for a stream and resets the connection at once
        with socket.create_connection((address.hostname, address.port), timeout=5) as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.sendall(f"GET /v1/sessions/{session}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.05)
    with httpx.Client(timeout=10) as first, httpx.Client(timeout=10) as second:

        def both_open() -> bool:
            with opened(first, gateway, session) as one, opened(second, gateway, session) as two:
                return (one.status_code, two.status_code) == (200, 200)

        eventually(both_open, timeout=15, what="the streams of clients gone had given their places back")
    eventually(lambda: streams_gauge(gateway) == 0, what="no stream left open")


def test_an_event_the_gateway_cannot_read_is_skipped_and_counted_and_the_stream_goes_on(stack, gateway):
    """``sse_stream_errors_total{reason="encode_error"}`` counts each event skipped, and the reply
    after it still reaches the client: what the metric's description says."""
    import redis

    from chatpipe.events import events_channel

    session = new_session(gateway)
    publisher = redis.Redis.from_url(stack["REDIS_URL"])
    try:
        url = f"{gateway}/v1/sessions/{session}/events"
        with httpx.Client(timeout=10) as client, client.stream("GET", url) as stream:
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            eventually(lambda: publisher.pubsub_numsub(events_channel(session))[0][1] == 1, what="subscribed")
            for data in (b"{not json", b'{"type": "message", "content": "hello", "reply_to": "m1"}'):
                publisher.publish(events_channel(session), data)
            relayed = [line for line, _ in zip(lines, range(3), strict=False) if line]
    finally:
        publisher.close()
    assert relayed[0] == "event: message" and '"content": "hello"' in relayed[1], relayed
    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    assert value(text, "sse_stream_errors_total", reason="encode_error") == 1
