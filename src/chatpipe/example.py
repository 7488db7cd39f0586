"""An example service instrumented with chatobs: sessions and messages, kept in memory.

It is the shape of the gateway (the real one, backed by PostgreSQL, Redis and
Kafka, replaces it with the pipeline issue) and is configured only by the
environment through :func:`chatobs.setup`.

Example::

    uvicorn --factory chatpipe.example:create_app
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

import chatobs

__all__ = ["MessageIn", "create_app"]


class MessageIn(BaseModel):
    role: str = "user"
    content: str
    source: str = "api"


def create_app() -> FastAPI:
    """Build the example app and bootstrap its telemetry (``/metrics`` included)."""
    app = FastAPI(title="chatobs example service")
    telemetry = chatobs.setup(service="gateway", app=app)
    sessions: dict[str, list[MessageIn]] = {}

    @app.post("/v1/sessions", status_code=201)
    async def create_session(x_tenant_id: str = Header("default")) -> dict[str, str]:
        session_id = uuid.uuid4().hex
        sessions[session_id] = []
        telemetry.traffic.session_created()
        return {"session_id": session_id, "tenant": x_tenant_id}

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str) -> None:
        if sessions.pop(session_id, None) is None:
            raise HTTPException(404, "no such session")
        telemetry.traffic.session_deleted()

    @app.post("/v1/sessions/{session_id}/messages", status_code=202)
    async def post_message(session_id: str, message: MessageIn) -> dict[str, str]:
        started = time.perf_counter()
        if session_id not in sessions:
            raise HTTPException(404, "no such session")
        sessions[session_id].append(message)
        telemetry.traffic.message_in(role=message.role, source=message.source)
        telemetry.traffic.enqueue(time.perf_counter() - started)
        return {"status": "accepted"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
