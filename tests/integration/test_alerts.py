"""The alert rules on a real Prometheus against the running pipeline: each fault, injected
through the simulators and the stack controls, fires its alert; steady traffic fires none.

The rules are the production ones rendered with the test profile (second-scale windows,
no `for`), so the test takes minutes rather than hours.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from chatobs.rules import TEST, render
from chatobs.stack import LocalStack
from chatpipe.launcher import Pipeline
from chatpipe.prometheus import LocalPrometheus
from tests.chat_client import ChatClient, eventually
from tests.conftest import PIPELINE_ENV, ROOT


class Load:
    """Steady chat traffic in the background (one message every `every` seconds)."""

    def __init__(self, gateway: str, every: float = 0.4):
        self._chat = ChatClient(gateway)
        self._session = self._chat.new_session()
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(httpx.HTTPError):  # a fault is being injected
                self._chat.http.post(f"/v1/sessions/{self._session}/messages", json={"content": "steady"}, timeout=5)
            self._stop.wait(self._every)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def watched(own_stack, tmp_path) -> Iterator[tuple[Pipeline, LocalPrometheus, LocalStack]]:
    local = own_stack()
    recording, alerts = render(TEST)
    with Pipeline(local.environment, tmp_path, env=PIPELINE_ENV) as pipeline, LocalPrometheus(
        ROOT / "otel" / "prometheus.yml", pipeline.metrics_urls, tmp_path, interval="1s",
        rules={"recording.yml": recording, "alerts.yml": alerts},
    ) as prometheus:  # fmt: skip
        yield pipeline, prometheus, local


@contextlib.contextmanager
def simulator_fault(url: str, **faults: object) -> Iterator[None]:
    """Apply ``faults`` to a simulator for the block, then put its previous settings back."""
    previous = httpx.get(f"{url}/control", timeout=5).json()
    httpx.post(f"{url}/control", json=faults, timeout=5).raise_for_status()
    try:
        yield
    finally:
        httpx.post(f"{url}/control", json=previous, timeout=5).raise_for_status()


@contextlib.contextmanager
def server_down(stack: LocalStack, name: str) -> Iterator[None]:
    stack.stop_server(name)
    try:
        yield
    finally:
        stack.start_server(name)


def fires(prometheus: LocalPrometheus, *alerts: str, timeout: float = 60) -> None:
    eventually(lambda: set(alerts) <= prometheus.alerts(), timeout=timeout, interval=1,
               what=f"{alerts} firing (firing now: {prometheus.alerts()})")  # fmt: skip


@pytest.mark.slow
def test_each_fault_fires_its_alert_and_steady_traffic_fires_none(watched):
    pipeline, prometheus, stack = watched
    with Load(pipeline.gateway_url):
        # Steady state: every target up, traffic flowing, no alert at all.
        eventually(lambda: prometheus.alerts("firing") == set() and _all_up(prometheus), timeout=40, interval=1,
                   what="steady state")  # fmt: skip
        time.sleep(25)  # a whole rate window of healthy traffic
        assert prometheus.alerts("firing") == set()
        assert prometheus.alerts("pending") == set()

        with simulator_fault(pipeline.llm_url, outage=True):
            fires(prometheus, "LLMProviderDown")
        with simulator_fault(pipeline.llm_url, latency_seconds=1.6):
            fires(prometheus, "LLMLatencyP95High")
        with simulator_fault(pipeline.somabrain_url, outage=True):
            fires(prometheus, "SomabrainCircuitOpen", "DegradedBufferGrowing")
        tiny = ChatClient(pipeline.gateway_url, tenant="tiny")  # 30 tokens a window
        tiny_session = tiny.new_session()
        for _ in range(3):  # one after the other, as a user would: the first spends the allowance
            tiny.http.post(f"/v1/sessions/{tiny_session}/messages", json={"content": "over budget"})
            time.sleep(2)
        fires(prometheus, "TenantBudgetOverrun")
        with server_down(stack, "redis"):
            fires(prometheus, "RedisErrorBurst")
        with server_down(stack, "kafka"):
            fires(prometheus, "OutboxBacklogNotDraining", "WALPublishErrors", "KafkaErrorBurst", timeout=90)
        with server_down(stack, "postgres"):
            fires(prometheus, "PostgreSQLErrorBurst", "ChatHTTP5xxRatioHigh")
    pipeline._processes["tool_executor"].process.kill()  # a service dies
    fires(prometheus, "ScrapeTargetDown")


def _all_up(prometheus: LocalPrometheus) -> bool:
    result = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": "up"}, timeout=5).json()["data"]["result"]
    return len(result) == 5 and all(sample["value"][1] == "1" for sample in result)
