"""A service waiting for its broker at start stops when told to, whatever the broker does."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest

from chatpipe.kafka import start_consumer, start_producer


@pytest.mark.parametrize("client", ["consumer", "producer"])
def test_a_stop_while_the_broker_takes_connections_and_never_answers_is_heeded_at_once(blackhole, client):
    # The blackhole takes TCP connections and answers nothing: aiokafka's start() waits out its
    # request timeout (40 s), and a SIGTERM meanwhile waited with it.
    bootstrap = urlsplit(blackhole).netloc

    async def scenario() -> tuple[object, float]:
        stopping = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stopping.set)
        started = time.monotonic()
        if client == "consumer":
            result: object = await start_consumer("chat.wal", "worker", bootstrap, stopping)
        else:
            result = await start_producer(bootstrap, stopping)
        return result, time.monotonic() - started

    result, seconds = asyncio.run(scenario())
    assert result is None
    assert seconds < 5, f"the stop was heeded after {seconds:.1f} s"
