"""The gateway application. Configured by the environment only (see ``chatpipe.settings``)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from fastapi import FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from opentelemetry import propagate
from pydantic import BaseModel, Field

import chatobs
from chatpipe.db import connect_pool, migrate
from chatpipe.events import ROLES, events_channel
from chatpipe.settings import load_backend_settings, load_pipeline_settings

__all__ = ["app", "create_app"]  # noqa: F822 - `app` is built lazily by __getattr__

_logger = logging.getLogger("chatpipe.gateway")
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UPLOAD_CHUNK = 64 * 1024
_KEEPALIVE_SECONDS = 15.0
_RETRY_AFTER_SECONDS = 2
#: Errors that mean PostgreSQL or Redis cannot be reached (down, restarting, refusing): 503, not 500.
BACKEND_UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,  # the connection broke
    asyncpg.InterfaceError,  # the connection or pool is closed
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, statement cancelled
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InternalClientError,  # a connection left in a broken state by the server going away
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,  # refused, reset (asyncpg connecting; Redis wraps its own)
    TimeoutError,  # no connection from the pool in time
)


class MessageIn(BaseModel):
    role: str = Field("user", description=f"One of {', '.join(ROLES)}.")
    content: str = Field(..., min_length=1)
    source: str = Field("api", max_length=64, description="Where the message came from (web, api, cli...).")


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": message})


def create_app() -> FastAPI:
    """Build the gateway: settings validated, telemetry set up, backends connected at start-up."""
    backends = load_backend_settings()
    settings = load_pipeline_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = aioredis.Redis.from_url(backends.redis_url, socket_timeout=5, socket_connect_timeout=2)
        app.state.pool = await connect_pool(backends.database_url)
        await migrate(app.state.pool)
        settings.attachment_dir.mkdir(parents=True, exist_ok=True)
        try:
            yield
        finally:
            await app.state.pool.close()
            await app.state.redis.aclose()

    app = FastAPI(title="chat gateway", lifespan=lifespan)
    telemetry = chatobs.setup(service="gateway", app=app)
    traffic = telemetry.traffic

    @app.exception_handler(HTTPException)
    async def json_errors(request: Request, exc: HTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code)

    async def backend_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Nothing was accepted (the outbox insert is the acceptance): the client may simply retry.
        backend = "redis" if type(exc).__module__.startswith("redis") else "postgres"
        _logger.warning("%s %s: %s unavailable: %r", request.method, request.url.path, backend, exc)
        return JSONResponse({"error": f"{backend} is unavailable; nothing was stored, retry shortly"},
                            status_code=503, headers={"Retry-After": str(_RETRY_AFTER_SECONDS)})  # fmt: skip

    for unavailable in BACKEND_UNAVAILABLE:
        app.add_exception_handler(unavailable, backend_unavailable)

    async def live_session(database: asyncpg.Pool | asyncpg.Connection, session_id: str) -> asyncpg.Record:
        row = await database.fetchrow("select id, tenant, deleted_at from sessions where id = $1", session_id)
        if row is None:
            raise _error(404, f"no session {session_id}")
        if row["deleted_at"] is not None:
            raise _error(410, f"session {session_id} was deleted")
        return row

    @app.post("/v1/sessions", status_code=201)
    async def create_session(x_tenant_id: Annotated[str, Header()]) -> dict[str, str]:
        if not _TENANT.fullmatch(x_tenant_id):
            raise _error(400, "X-Tenant-ID must be 1-64 letters, digits, '.', '_' or '-'")
        session_id = uuid.uuid4().hex
        await app.state.pool.execute("insert into sessions (id, tenant) values ($1, $2)", session_id, x_tenant_id)
        traffic.session_created()
        return {"session_id": session_id}

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str) -> None:
        await live_session(app.state.pool, session_id)
        await app.state.pool.execute("update sessions set deleted_at = now() where id = $1", session_id)
        traffic.session_deleted()

    @app.post("/v1/sessions/{session_id}/messages", status_code=202)
    async def post_message(session_id: str, message: MessageIn) -> dict[str, str]:
        if message.role not in ROLES:
            raise _error(422, f"role must be one of {', '.join(ROLES)}")
        if len(message.content) > settings.message_max_chars:
            raise _error(413, f"message longer than {settings.message_max_chars} characters")
        message_id = uuid.uuid4().hex
        stored = False
        with traffic.time_enqueue():
            try:
                async with app.state.pool.acquire() as connection:
                    session = await live_session(connection, session_id)
                    carrier: dict[str, str] = {}
                    propagate.inject(carrier)  # the publisher continues this request's trace
                    payload = {
                        "message_id": message_id,
                        "session_id": session_id,
                        "tenant": session["tenant"],
                        "role": message.role,
                        "content": message.content,
                        "source": message.source,
                        "accepted_at": time.time(),
                    }
                    await connection.execute(
                        "insert into outbox (message_id, session_id, payload, traceparent) values ($1, $2, $3, $4)",
                        message_id, session_id, json.dumps(payload), carrier.get("traceparent"),
                    )  # fmt: skip
                    stored = True
            except BACKEND_UNAVAILABLE:
                # PostgreSQL going away can break the connection as the pool takes it back, after the
                # insert: the message is stored then, and refusing it would make the client send it twice.
                if not stored:
                    raise
                _logger.warning("message %s stored; its connection broke afterwards", message_id)
        traffic.message_in(role=message.role, source=message.source)
        return {"message_id": message_id}

    @app.post("/v1/sessions/{session_id}/attachments", status_code=201)
    async def upload(session_id: str, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        started = time.perf_counter()
        await live_session(app.state.pool, session_id)
        content_type = (file.content_type or "application/octet-stream").split(";")[0].strip()
        if content_type not in settings.attachment_types:
            raise _error(
                415, f"content type {content_type} not accepted; allowed: {', '.join(settings.attachment_types)}"
            )
        attachment_id = uuid.uuid4().hex
        directory = settings.attachment_dir / session_id
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / attachment_id
        size = await _store(file, path, settings.attachment_max_bytes)
        await app.state.pool.execute(
            "insert into attachments (id, session_id, filename, content_type, size_bytes, path)"
            " values ($1, $2, $3, $4, $5, $6)",
            attachment_id, session_id, file.filename or attachment_id, content_type, size, str(path),
        )  # fmt: skip
        traffic.attachment_uploaded(time.perf_counter() - started)
        return {"attachment_id": attachment_id, "size_bytes": size, "content_type": content_type}

    @app.get("/v1/sessions/{session_id}/events")
    async def events(session_id: str, request: Request) -> StreamingResponse:
        await live_session(app.state.pool, session_id)
        pubsub = app.state.redis.pubsub()
        await pubsub.subscribe(events_channel(session_id))
        return StreamingResponse(
            _sse(pubsub, request, telemetry, settings.sse_timeout_seconds),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> str:
        return resources.files("chatpipe.gateway").joinpath("static/index.html").read_text()

    @app.get("/health")
    async def health() -> JSONResponse:
        checks = {
            "redis": _check(app.state.redis.ping()),
            "postgres": _check(app.state.pool.fetchval("select 1")),
        }
        results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
        for component, ok in results.items():
            telemetry.health.check(component, ok=ok)
        status = 200 if all(results.values()) else 503
        return JSONResponse({name: "ok" if ok else "fail" for name, ok in results.items()}, status_code=status)

    return app


async def _check(probe: Any, timeout: float = 1.0) -> bool:
    try:
        await asyncio.wait_for(probe, timeout)
        return True
    except Exception:  # noqa: BLE001 - a failed probe is the answer, not an error
        return False


async def _store(upload: UploadFile, path: Path, limit: int) -> int:
    """Stream ``upload`` to ``path``; over ``limit`` bytes, remove it and answer 413."""
    size = 0
    try:
        with path.open("wb") as out:
            while chunk := await upload.read(_UPLOAD_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise _error(413, f"attachment larger than {limit} bytes")
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


async def _sse(pubsub: Any, request: Request, telemetry: chatobs.Telemetry, idle_timeout: float) -> AsyncIterator[str]:
    """Relay the worker's events for one session as Server-Sent Events."""
    traffic = telemetry.traffic
    traffic.sse_client_connected()
    replying = False  # a reply is in flight: a disconnect now loses tokens
    last_event = last_write = time.monotonic()
    try:
        yield ": connected\n\n"
        while True:
            if await request.is_disconnected():
                if replying:
                    traffic.sse_stream_error("client_disconnect")
                return
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception:  # noqa: BLE001 - Redis went away mid-stream
                traffic.sse_stream_error("backend_error")
                yield 'event: error\ndata: {"error": "event stream interrupted"}\n\n'
                return
            if message is None:
                now = time.monotonic()
                if now - last_event > idle_timeout:
                    traffic.sse_stream_error("timeout")
                    return
                if now - last_write > _KEEPALIVE_SECONDS:  # proxies close silent connections
                    last_write = now
                    yield ": keep-alive\n\n"
                continue
            last_event = last_write = time.monotonic()
            try:
                event = json.loads(message["data"])
                kind = str(event.get("type", "message"))
            except (ValueError, TypeError, AttributeError):
                traffic.sse_stream_error("encode_error")
                continue
            replying = kind == "token"
            yield f"event: {kind}\ndata: {json.dumps(event)}\n\n"
    finally:
        traffic.sse_client_disconnected()
        try:
            await pubsub.aclose()
        except Exception:
            _logger.debug("closing pubsub failed", exc_info=True)


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `uvicorn chatpipe.gateway:app` builds the app on first access, so importing this
    # module (tests, tools) reads no environment and connects to nothing.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
