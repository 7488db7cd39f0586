"""A service using real Redis and PostgreSQL (REDIS_URL, DATABASE_URL), bootstrapped by setup().

Every request touches a backend through its instrumented client; nothing here counts
errors by hand: `redis_errors_total` and `postgres_errors_total` must come from the
client spans.
"""

from __future__ import annotations

import os

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException
from opentelemetry import trace

import chatobs

app = FastAPI()
telemetry = chatobs.setup(service="gateway", app=app)
redis_client = aioredis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=1, socket_connect_timeout=1)
DATABASE_URL = os.environ["DATABASE_URL"]


async def _query(sql: str, *args: object) -> object:
    connection = await asyncpg.connect(DATABASE_URL, timeout=2)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


@app.put("/kv/{key}")
async def put(key: str, value: str) -> dict[str, str]:
    await redis_client.set(key, value)
    return {"key": key}


@app.get("/kv/{key}")
async def get(key: str) -> dict[str, str | None]:
    value = await redis_client.get(key)
    # The request's trace id, so a test can look for it among Prometheus's exemplars.
    trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
    return {"value": value.decode() if value else None, "trace_id": trace_id}


@app.post("/kv/{key}/push")
async def push(key: str, value: str) -> dict[str, int]:
    try:
        return {"length": await redis_client.lpush(key, value)}
    except Exception as error:  # a WRONGTYPE reply or a dead server: the client span records it
        raise HTTPException(502, f"redis: {type(error).__name__}") from error


@app.get("/sql")
async def sql(statement: str) -> dict[str, str]:
    try:
        return {"result": str(await _query(statement))}
    except Exception as error:
        raise HTTPException(502, f"postgres: {type(error).__name__}") from error
