"""Outages without loss: under steady chat load, Redis, PostgreSQL, the broker, Somabrain and the LLM
are each stopped for a few seconds in turn and started again. Meanwhile every service's /metrics
answers within a second and chat degrades as designed; afterwards every message the gateway
accepted is in the replicated store exactly once, and every accepted turn was answered."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from chatpipe.launcher import Pipeline
from tests.chat_client import eventually
from tests.conftest import PIPELINE_ENV
from tests.load import SteadyLoad, stored
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


def first_request_error(log: Path, lines: int = 40) -> str:
    """The first exception the server logged for a request: what an unexpected 500 was."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    starts = [number for number, line in enumerate(text) if "Exception in ASGI application" in line]
    return "\n".join(text[starts[0] : starts[0] + lines]) if starts else f"(no request error in {log})"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_outage_in_turn_loses_nothing_and_metrics_keep_answering(own_stack, tmp_path):
    local = own_stack()
    backends = local.environment

    def settled(messages: list[str]) -> None:
        """Wait until every one of ``messages`` is replicated and its turn answered."""
        wanted = set(messages)
        eventually(lambda: stored(backends["DATABASE_URL"])[1] >= wanted, timeout=90, interval=1,
                   what="all accepted replicated")  # fmt: skip
        with redis.Redis.from_url(backends["REDIS_URL"]) as answered:
            eventually(lambda: answered.exists(*(f"answered:{message}" for message in wanted)) == len(wanted),
                       timeout=90, interval=1, what="every accepted turn answered")  # fmt: skip

    with Pipeline(backends, tmp_path, env=ENV) as pipeline:
        scrapes = Scrapes(pipeline)
        gateway = httpx.Client(base_url=pipeline.gateway_url, timeout=10)
        sessions = [gateway.post("/v1/sessions", headers={"X-Tenant-ID": "acme"}).json()["session_id"]
                    for _ in range(3)]  # fmt: skip
        load = SteadyLoad(pipeline.gateway_url, sessions, interval=SEND_INTERVAL_SECONDS).start()
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
            # The local broker keeps records in memory, so a restart loses those not yet consumed
            # (a real Kafka keeps them): the load pauses until every turn so far is answered and
            # replicated, and resumes once the broker is down, so what is checked is the outbox.
            load.pause()
            settled(load.accepted)

            def stop_broker() -> None:
                local.stop_server("kafka")
                load.resume()

            _, during, accepted, _ = outage(stop_broker, lambda: local.start_server("kafka"))
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
        assert load.unexpected == [] and load.transport_errors == [], (
            (load.unexpected + load.transport_errors)[:5],
            first_request_error(tmp_path / "gateway.log"),
        )
        assert max(slowest.values()) < SCRAPE_LIMIT_SECONDS, slowest

        # After recovery: every accepted message replicated exactly once, every accepted turn answered.
        accepted = set(load.accepted)
        assert len(accepted) == len(load.accepted)
        database = backends["DATABASE_URL"]
        settled(load.accepted)
        rows, ids, _ = stored(database)
        assert rows == len(ids) == len(accepted) and ids == accepted, "each accepted message stored exactly once"
        eventually(lambda: stored(database)[2] == 0, timeout=30, what="every outbox row confirmed")
        codes = pipeline.stop()
    assert all(code == 0 for name, code in codes.items() if not name.endswith("_sim")), codes
