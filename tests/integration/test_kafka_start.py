"""A service waiting for its broker at start stops when told to, whatever the broker does."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest

from chatpipe.kafka import start_consumer, start_producer
from tests.chat_client import eventually
from tests.conftest import PORT
from tests.metrics_text import value


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


#: Each service, the dependency its probes reach while no broker answers, and a gauge of its own.
_SERVICES = {
    "chatpipe.worker": ("redis", "degraded_buffer_size "),
    "chatpipe.outbox.replicator": ("postgres", None),
    "chatpipe.tools": ("redis", None),
}


@pytest.mark.parametrize("module", sorted(_SERVICES))
def test_a_service_started_while_the_broker_is_down_reports_its_health_meanwhile(stack, start_service, module):
    """The worker, replicator and tool executor waited for a broker before their loops: until
    one answered, their scrape had no health checks (nor the worker's gauges), so a dashboard
    could not tell a broker outage from a dead service. The publisher's case is in test_publisher."""
    dependency, gauge = _SERVICES[module]
    with socket.socket() as nothing_listens:  # a port of this machine where no broker answers
        nothing_listens.bind(("127.0.0.1", 0))
        bootstrap = f"127.0.0.1:{nothing_listens.getsockname()[1]}"
    env = {**stack, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CHATOBS_METRICS_PORT": PORT,
           "CHATOBS_METRICS_HOST": "127.0.0.1", "CHATPIPE_LLM_BASE_URL": "http://127.0.0.1:9/v1",
           "CHATPIPE_SOMABRAIN_URL": "http://127.0.0.1:9", "CHATPIPE_BACKLOG_POLL_SECONDS": "0.5",
           "CHATPIPE_HEALTH_PROBE_SECONDS": "0.5"}  # fmt: skip
    service = start_service(env, command=[sys.executable, "-m", module])

    def measured() -> str | None:
        # Each probe is counted as it ends: Kafka's fails at once, the dependency's comes after.
        text = httpx.get(f"{service.base_url}/metrics", timeout=5).text
        ready = (value(text, "health_checks_total", component=dependency, result="ok") >= 1
                 and value(text, "health_checks_total", component="kafka", result="fail") >= 1
                 and (gauge is None or gauge in text))  # fmt: skip
        return text if ready else None

    text = eventually(measured, timeout=20, what=f"{dependency} checked ok and kafka failing")
    assert value(text, "health_checks_total", component="kafka", result="ok") == 0
    assert service.process.poll() is None, "still waiting for a broker, not exited"
