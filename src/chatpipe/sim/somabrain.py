"""A Somabrain (memory service) simulator with fault injection.

``POST /recall`` returns memories of a session; ``POST /remember`` stores one,
idempotently by ``id`` (a replay after an outage must not duplicate).

Faults (``POST /control``): ``latency_seconds``; ``hang`` (requests wait until the
client gives up: a timeout); ``outage`` (503); ``malformed`` (``/recall`` answers 200
with the memories as a bare JSON list, not ``{"memories": [...]}``).

Example::

    uvicorn chatpipe.sim.somabrain:app --port 8082
    curl -X POST localhost:8082/control -d '{"hang": true}'
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

__all__ = ["Memory", "SomabrainFaults", "app"]


class SomabrainFaults(BaseModel):
    latency_seconds: float = Field(0.02, ge=0, le=120)
    hang: bool = False
    outage: bool = False
    malformed: bool = False


class Memory(BaseModel):
    id: str
    tenant: str
    session_id: str
    text: str


class RecallRequest(BaseModel):
    tenant: str
    session_id: str
    query: str = ""
    limit: int = Field(5, ge=1, le=100)


app = FastAPI(title="Somabrain simulator")
app.state.faults = SomabrainFaults()
app.state.memories = {}


async def _faults() -> JSONResponse | None:
    faults: SomabrainFaults = app.state.faults
    if faults.outage:
        return JSONResponse({"error": "simulated outage"}, status_code=503)
    if faults.hang:
        # Hold the request until the fault is lifted (the client's timeout usually ends it first).
        for _ in range(600):
            if not app.state.faults.hang:
                break
            await asyncio.sleep(0.1)
    await asyncio.sleep(faults.latency_seconds)
    return None


@app.post("/recall", response_model=None)
async def recall(request: RecallRequest) -> JSONResponse | dict[str, Any]:
    if (failure := await _faults()) is not None:
        return failure
    found = [m.model_dump() for m in app.state.memories.values() if m.session_id == request.session_id]
    if app.state.faults.malformed:
        return JSONResponse(found[-request.limit :])
    return {"memories": found[-request.limit :]}


@app.post("/remember", response_model=None)
async def remember(memory: Memory) -> JSONResponse | dict[str, Any]:
    if (failure := await _faults()) is not None:
        return failure
    created = memory.id not in app.state.memories
    app.state.memories.setdefault(memory.id, memory)
    return {"stored": created}


@app.get("/memories")
async def memories(session_id: str | None = None) -> dict[str, Any]:
    """Everything remembered (for tests and the demo's summary)."""
    found = [m.model_dump() for m in app.state.memories.values() if session_id in (None, m.session_id)]
    return {"memories": found, "count": len(found)}


@app.get("/control")
async def get_control() -> SomabrainFaults:
    return app.state.faults


@app.post("/control")
async def set_control(changes: dict[str, Any]) -> SomabrainFaults:
    app.state.faults = SomabrainFaults.model_validate({**app.state.faults.model_dump(), **changes})
    return app.state.faults


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
