"""Graceful shutdown: under steady chat load, each service in turn gets SIGTERM. It stops taking work,
finishes what it has in flight, pushes its last spans and metrics to the collector, exits 0
promptly, and once it is started again nothing was lost: every accepted message replicated once,
every accepted turn answered once."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest
import redis

from chatpipe.events import events_channel
from chatpipe.launcher import Pipeline
from tests.chat_client import eventually
from tests.conftest import PIPELINE_ENV
from tests.load import SteadyLoad, stored
from tests.otlp_receiver import OtlpReceiver

# The worker last: its restart is the slowest to get turns answered again (rejoining its group).
SERVICES = ("gateway", "publisher", "replicator", "tool_executor", "worker")
#: SIGTERM to exit: the gateway's graceful window (3 s in the launcher) plus the last push, with margin.
STOP_LIMIT_SECONDS = 10.0


class Replies:
    """Every final reply the worker publishes for the sessions, counted by the message it answers."""

    def __init__(self, redis_url: str, sessions: list[str]):
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(*(events_channel(session) for session in sessions))
        self.answers: Counter[str] = Counter()
        self.errors: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            event = json.loads(message["data"])
            if event.get("type") == "message":
                self.answers[event["reply_to"]] += 1
            elif event.get("type") == "error":
                self.errors.append(event)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()


def ask_for_a_tool_now_and_then(number: int) -> str:
    """Every fourth message asks for a tool, so the tool executor has work in flight too."""
    return f"calc: {number}*7" if number % 4 == 0 else f"steady message {number}"


@pytest.fixture
def receiver():
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_each_service_under_load_loses_nothing_and_flushes_otlp(own_stack, receiver, tmp_path):
    local = own_stack()
    env = {
        **PIPELINE_ENV,
        "CHATPIPE_MESSAGE_BUDGET": "100000",
        "CHATPIPE_TOKEN_BUDGET": "10000000",
        "OTEL_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # Nothing is pushed while a service runs: whatever arrives was pushed by its shutdown.
        "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
        "OTEL_BSP_SCHEDULE_DELAY": "3600000",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100000",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100000",
    }
    with Pipeline(local.environment, tmp_path, env=env) as pipeline:
        gateway = httpx.Client(base_url=pipeline.gateway_url, timeout=10)
        sessions = [gateway.post("/v1/sessions", headers={"X-Tenant-ID": "acme"}).json()["session_id"]
                    for _ in range(3)]  # fmt: skip
        replies = Replies(local.environment["REDIS_URL"], sessions)
        load = SteadyLoad(pipeline.gateway_url, sessions, content=ask_for_a_tool_now_and_then).start()
        stops: dict[str, float] = {}
        try:
            for service in SERVICES:
                replied = sum(replies.answers.values())
                eventually(lambda: sum(replies.answers.values()) >= replied + 4, timeout=60,  # noqa: B023
                           what=f"turns answered before stopping {service}")  # fmt: skip
                assert receiver.pushes_by_service()[service] == 0, "nothing pushed before the shutdown"
                assert receiver.spans_by_service()[service] == 0
                started = time.monotonic()
                code = pipeline.stop_process(service)
                stops[service] = time.monotonic() - started
                assert code == 0, f"{service} exited with {code}"
                assert stops[service] < STOP_LIMIT_SECONDS, f"{service} took {stops[service]:.1f}s to stop"
                # It pushed its last metrics and spans before exiting.
                assert receiver.pushes_by_service()[service] >= 1, f"{service} did not push its last metrics"
                assert receiver.spans_by_service()[service] >= 1, f"{service} did not push its last spans"
                pipeline.start_process(service)
            replied = sum(replies.answers.values())
            eventually(lambda: sum(replies.answers.values()) >= replied + 8, timeout=60, what="turns after restarts")
        finally:
            load.stop()

        stopped_in = {name: round(seconds, 2) for name, seconds in stops.items()}
        print(f"\nSIGTERM to exit (s): {stopped_in}; {len(load.accepted)} accepted, "
              f"{len(load.transport_errors)} not answered while the gateway restarted")  # fmt: skip
        assert load.unexpected == [], load.unexpected[:5]
        accepted = set(load.accepted)
        database = local.environment["DATABASE_URL"]
        eventually(lambda: stored(database)[1] >= accepted, timeout=60, interval=1, what="all accepted replicated")
        rows, ids, _ = stored(database)
        assert rows == len(ids) == len(accepted) and ids == accepted, "each accepted message stored exactly once"
        eventually(lambda: set(replies.answers) >= accepted, timeout=60, interval=1, what="every turn answered")
        replies.close()
        interrupted = [error["reply_to"] for error in replies.errors if error.get("reason") == "interrupted"]
        print(f"{len(interrupted)} turn(s) cut off by a stop and answered again")
        # A turn a stop cut off says so (and is answered again, above); nothing else may fail.
        assert [error for error in replies.errors if error.get("reason") != "interrupted"] == []
        twice = {message: count for message, count in replies.answers.items() if count > 1}
        assert twice == {}, f"answered more than once: {twice}"
