"""Outages without loss: under steady chat load, Redis, PostgreSQL, the broker, Somabrain and the LLM
are each stopped for a few seconds in turn and started again. Meanwhile every service's /metrics
answers within a second and chat degrades as designed; afterwards every message the gateway
accepted is in the replicated store exactly once, and every accepted turn was answered."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import httpx
import pytest
import redis

from chatpipe.launcher import Pipeline
from tests.chat_client import eventually
from tests.conftest import PIPELINE_ENV
from tests.metrics_text import value

OUTAGE_SECONDS = 4.0
SEND_INTERVAL_SECONDS = 0.12  # about 8 messages a second
SCRAPE_LIMIT_SECONDS = 1.0
ENV = {
    **PIPELINE_ENV,
    "CHATPIPE_MESSAGE_BUDGET": "100000",  # the load must not run into the default budgets
    "CHATPIPE_TOKEN_BUDGET": "10000000",
    "CHATPIPE_OUTBOX_REDELIVER_SECONDS": "3",  # the in-memory broker forgets on restart: send again soon
}


@dataclass
class Load:
    """Chat messages posted at a steady rate from a thread; what the gateway answered is kept."""

    gateway: str
    sessions: list[str]
    accepted: list[str] = field(default_factory=list)  # message ids of 2xx answers
    statuses: Counter[int] = field(default_factory=Counter)
    refusals: list[dict[str, object]] = field(default_factory=list)  # 503 bodies
    unexpected: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # A generous timeout: a request given up on by the client might still have been stored.
        with httpx.Client(base_url=self.gateway, timeout=20) as client:
            number = 0
            while not self._stop.is_set():
                session = self.sessions[number % len(self.sessions)]
                number += 1
                try:
                    response = client.post(f"/v1/sessions/{session}/messages",
                                           json={"content": f"steady message {number}", "source": "api"})  # fmt: skip
                except httpx.HTTPError as error:
                    self.unexpected.append(f"message {number}: {error!r}")
                else:
                    self.statuses[response.status_code] += 1
                    if response.status_code == 202:
                        self.accepted.append(response.json()["message_id"])
                    elif response.status_code == 503:
                        self.refusals.append(response.json())
                    else:
                        self.unexpected.append(f"message {number}: {response.status_code} {response.text[:200]}")
                self._stop.wait(SEND_INTERVAL_SECONDS)

    def accepted_count(self) -> int:
        return len(self.accepted)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


class Scrapes:
    def __init__(self, pipeline: Pipeline):
        self.urls = pipeline.metrics_urls
        self.slowest: dict[str, float] = dict.fromkeys(self.urls, 0.0)

    def text(self, service: str) -> str:
        started = time.perf_counter()
        response = httpx.get(self.urls[service], timeout=10)
        self.slowest[service] = max(self.slowest[service], time.perf_counter() - started)
        assert response.status_code == 200, (service, response.status_code)
        return response.text

    def all(self) -> dict[str, str]:
        return {service: self.text(service) for service in self.urls}

    def value(self, service: str, name: str, **labels: str) -> float:
        return value(self.text(service), name, **labels)

    def poll_during(self, seconds: float) -> dict[str, str]:
        """Scrape every service again and again for ``seconds``; return the last scrapes."""
        deadline = time.monotonic() + seconds
        last = self.all()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            last = self.all()
        return last


def stored(database_url: str) -> tuple[int, set[str], int]:
    """(rows, distinct message ids) of the replicated store, and outbox rows not yet confirmed."""

    async def query() -> tuple[int, set[str], int]:
        connection = await asyncpg.connect(database_url)
        try:
            ids = [row["message_id"] for row in await connection.fetch("select message_id from replicated_messages")]
            unconfirmed = await connection.fetchval("select count(*) from outbox where confirmed_at is null")
            return len(ids), set(ids), unconfirmed
        finally:
            await connection.close()

    return asyncio.run(query())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_outage_in_turn_loses_nothing_and_metrics_keep_answering(own_stack, tmp_path):
    local = own_stack()
    backends = local.environment
    with Pipeline(backends, tmp_path, env=ENV) as pipeline:
        scrapes = Scrapes(pipeline)
        gateway = httpx.Client(base_url=pipeline.gateway_url, timeout=10)
        sessions = [gateway.post("/v1/sessions", headers={"X-Tenant-ID": "acme"}).json()["session_id"]
                    for _ in range(3)]  # fmt: skip
        load = Load(pipeline.gateway_url, sessions).start()
        try:
            eventually(lambda: load.accepted_count() >= 10, what="load flowing")

            def outage(stop: Callable[[], object], start: Callable[[], object],
                       check: Callable[[], object] = lambda: None) -> tuple[dict, dict, int, int]:  # fmt: skip
                """Stop, keep scraping through the outage, ``check``, start again: (scrapes before, during;
                messages accepted and refused during)."""
                before = scrapes.all()
                accepted, refused = load.accepted_count(), len(load.refusals)
                stop()
                during = scrapes.poll_during(OUTAGE_SECONDS)
                check()
                accepted_during, refused_during = load.accepted_count() - accepted, len(load.refusals) - refused
                start()
                return before, during, accepted_during, refused_during

            def moved(before: dict, after: dict, service: str, name: str, **labels: str) -> float:
                return value(after[service], name, **labels) - value(before[service], name, **labels)

            def healthy() -> bool:
                return gateway.get("/health").status_code == 200

            def flowing_again(timeout: float = 60) -> None:
                """Wait until turns are answered and messages replicated again (consumers back in their groups)."""
                replies = scrapes.value("worker", "assistant_emitted_total")
                replicated = scrapes.value("replicator", "wal_consume_seconds_count")
                eventually(lambda: scrapes.value("worker", "assistant_emitted_total") > replies
                           and scrapes.value("replicator", "wal_consume_seconds_count") > replicated,
                           timeout=timeout, what="turns answered and messages replicated again")  # fmt: skip

            def health_says(redis: str, postgres: str) -> Callable[[], None]:
                def check() -> None:
                    response = gateway.get("/health")
                    assert (response.status_code, response.json()) == (503, {"redis": redis, "postgres": postgres})

                return check

            # Redis: messages are still accepted (the outbox is PostgreSQL); turns wait for Redis.
            before, during, accepted, _ = outage(lambda: local.stop_server("redis"),
                                                 lambda: local.start_server("redis"),
                                                 health_says(redis="fail", postgres="ok"))  # fmt: skip
            assert accepted > 0, "the gateway kept accepting messages with Redis down"
            assert moved(before, during, "worker", "redis_errors_total") > 0
            eventually(healthy, timeout=30, what="healthy after Redis")
            flowing_again()

            # PostgreSQL: nothing can be stored, so messages are refused with a clear 503, never a 500.
            before, during, _, refused = outage(lambda: local.stop_server("postgres"),
                                                lambda: local.start_server("postgres"),
                                                health_says(redis="ok", postgres="fail"))  # fmt: skip
            assert refused > 0, "the gateway refused messages with PostgreSQL down"
            assert load.refusals[-1] == {"error": "postgres is unavailable; nothing was stored, retry shortly"}
            assert moved(before, during, "gateway", "postgres_errors_total") > 0
            assert moved(before, during, "publisher", "postgres_errors_total") > 0
            eventually(healthy, timeout=30, what="healthy after PostgreSQL")
            flowing_again()

            # The broker: messages are accepted and wait in the outbox (a produce fails only after its
            # 5 s request timeout, so wal_publish_errors_total may not move in a short outage).
            _, during, accepted, _ = outage(lambda: local.stop_server("kafka"), lambda: local.start_server("kafka"))
            assert accepted > 0
            assert value(during["publisher"], "outbox_pending") > 0, "accepted messages wait in the outbox"
            eventually(lambda: scrapes.value("publisher", "outbox_pending") == 0, timeout=60,
                       what="outbox drained after the broker")  # fmt: skip
            flowing_again()

            # Somabrain: turns go on in degraded bypass, memory writes are buffered.
            before, during, _, _ = outage(lambda: pipeline.stop_process("somabrain_sim"),
                                          lambda: pipeline.start_process("somabrain_sim"))  # fmt: skip
            assert moved(before, during, "worker", "somabrain_bypass_total") > 0
            assert moved(before, during, "worker", "assistant_emitted_total", mode="degraded") > 0
            eventually(lambda: scrapes.value("worker", "circuit_state", component="somabrain") == 0, timeout=30,
                       what="Somabrain circuit closed again")  # fmt: skip
            eventually(lambda: scrapes.value("worker", "degraded_buffer_size") == 0, timeout=30,
                       what="buffered memory writes replayed")  # fmt: skip

            # The LLM: each turn is answered with an error and counted; the worker goes on afterwards.
            before, during, _, _ = outage(lambda: pipeline.stop_process("llm_sim"),
                                          lambda: pipeline.start_process("llm_sim"))  # fmt: skip
            assert moved(before, during, "worker", "llm_errors_total", code="connection") > 0
            normal_replies = scrapes.value("worker", "assistant_emitted_total", mode="normal")
            eventually(lambda: scrapes.value("worker", "assistant_emitted_total", mode="normal") > normal_replies,
                       timeout=30, what="normal replies again after the LLM came back")  # fmt: skip
        finally:
            load.stop()

        slowest = {service: round(seconds, 3) for service, seconds in scrapes.slowest.items()}
        print(f"\noutages: {dict(load.statuses)} answers; slowest scrape per service (s): {slowest}")
        assert load.unexpected == [], load.unexpected[:5]
        assert max(slowest.values()) < SCRAPE_LIMIT_SECONDS, slowest

        # After recovery: every accepted message replicated exactly once, every accepted turn answered.
        accepted = set(load.accepted)
        assert len(accepted) == len(load.accepted)
        database = backends["DATABASE_URL"]
        eventually(lambda: stored(database)[1] >= accepted, timeout=90, interval=1, what="all accepted replicated")
        rows, ids, _ = stored(database)
        assert rows == len(ids) == len(accepted) and ids == accepted, "each accepted message stored exactly once"
        eventually(lambda: stored(database)[2] == 0, timeout=30, what="every outbox row confirmed")
        answered = redis.Redis.from_url(backends["REDIS_URL"])
        try:
            eventually(lambda: answered.exists(*(f"answered:{message}" for message in accepted)) == len(accepted),
                       timeout=90, interval=1, what="every accepted turn answered")  # fmt: skip
        finally:
            answered.close()
        codes = pipeline.stop()
    assert all(code == 0 for name, code in codes.items() if not name.endswith("_sim")), codes
