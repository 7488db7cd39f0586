"""A FastAPI app configured only by environment variables (CHATOBS_SERVICE picks the role).

``POST /exercise`` records one valid observation into every catalogue metric the
recorders offer, so each family has samples whose labels and buckets can be checked.
``POST /bad-labels`` records values outside the allowed sets.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

import chatobs
from chatobs import CircuitState

app = FastAPI()


@app.get("/metrics")
def legacy_metrics() -> PlainTextResponse:
    # The service's pre-existing /metrics route (as with prometheus_client): chatobs must take it over.
    return PlainTextResponse("legacy_route_still_served 1\n")


telemetry = chatobs.setup(app=app)


@app.post("/exercise")
def exercise() -> dict[str, str]:
    t = telemetry
    t.traffic.message_in(role="user", source="web")
    t.traffic.session_created()
    t.traffic.session_deleted()
    t.traffic.attachment_uploaded(0.2)
    t.traffic.sse_client_connected()
    t.traffic.sse_stream_error("timeout")
    t.traffic.enqueue(0.07)
    t.somabrain.context_build(0.3)
    t.somabrain.event_to_response(1.5, "normal")
    t.somabrain.call("success")
    t.somabrain.bypass()
    t.somabrain.assistant_emitted("normal")
    t.somabrain.circuit_state("somabrain", CircuitState.HALF_OPEN)
    t.llm.request("sim-large", "simulator", "normal")
    t.llm.latency(0.8, "sim-large", "simulator", "normal")
    t.llm.time_to_first_token(0.12, "sim-large", "simulator")
    t.llm.tokens("sim-large", "simulator", prompt=120, completion=900)
    t.llm.error("simulator", "http_5xx")
    t.backlog.outbox_pending(4)
    t.backlog.degraded_buffer_size(2)
    t.backlog.wal_published(0.02)
    t.backlog.wal_publish_error("produce")
    t.backlog.wal_consumed(0.04)
    t.backlog.redis_error("get")
    t.backlog.kafka_error("produce")
    t.backlog.postgres_error("insert")
    t.budgets.tokens("acme", allowed=10_000, used=1_020)
    t.budgets.messages("acme", allowed=100, used=3)
    t.budgets.token_overrun("acme")
    t.budgets.message_overrun("acme")
    t.tools.call("calculator", "success", seconds=0.01)
    t.health.check("postgres", ok=True)
    return {"status": "recorded"}


@app.post("/bad-labels")
def bad_labels() -> dict[str, str]:
    telemetry.somabrain.call("exploded")
    telemetry.traffic.message_in(role="robot", source="web")
    telemetry.llm.latency(None, "m", "p")  # type: ignore[arg-type] - a caller bug must not raise
    return {"status": "recorded"}
