"""The gateway application. Configured by the environment only (see ``chatpipe.settings``).

Every error a client can cause is a 4xx with a JSON body ``{"error": "...", "detail": ...}``
(``detail`` only where there is more to say), never a 500: malformed or non-JSON bodies,
bodies over ``CHATPIPE_REQUEST_MAX_BYTES`` / ``CHATPIPE_ATTACHMENT_MAX_BYTES`` (refused from
their ``Content-Length`` before they are read, or as soon as a streamed body passes the
limit), unknown or malformed session ids, unknown routes and methods. A client that closes
the connection before its body was read is answered (and counted) 499, as nginx logs it.

A message posted with an ``Idempotency-Key`` header is stored once however often it is
sent: a retry gets the same ``message_id`` (202, ``Idempotent-Replayed: true``), and is
not answered or charged again. A 503 says whether the message may have been stored. A
message is stored only while its session is: one racing the session's DELETE waits for it,
and is refused (410) if the DELETE wins.

At most ``CHATPIPE_SSE_MAX_STREAMS`` event streams are open at once (each holds a Redis
pub/sub connection); one more is answered 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

import chatobs
from chatobs.propagation import traceparent
from chatpipe.db import connect_pool, migrate
from chatpipe.events import ROLES, events_channel
from chatpipe.health import HealthProbes, postgres_ping
from chatpipe.runtime import freeze_startup_objects
from chatpipe.settings import load_backend_settings, load_pipeline_settings

__all__ = ["app", "create_app"]  # noqa: F822 - `app` is built lazily by __getattr__

_logger = logging.getLogger("chatpipe.gateway")
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Session ids are what create_session makes (uuid4 hex); anything else names no session.
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
#: An ``Idempotency-Key`` header: what a client retries a message with (printable ASCII, no spaces).
_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,128}")
#: Namespace of the message ids made from a session and an idempotency key.
_IDEMPOTENT_MESSAGES = uuid.UUID("5b0b8a7e-3f0c-4b8e-9a51-6b1f3c2d7e90")
_UPLOAD_CHUNK = 64 * 1024
#: Room for the multipart boundaries and part headers around an attachment of the largest size.
_MULTIPART_OVERHEAD = 16 * 1024
_KEEPALIVE_SECONDS = 15.0
_RETRY_AFTER_SECONDS = 2
#: How long `/health` waits for each backend (a load balancer's probe wants its answer soon).
_HEALTH_TIMEOUT_SECONDS = 1.0
#: The status of a request whose client closed the connection before its body was read.
_CLIENT_CLOSED = 499
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

    @field_validator("role", "content", "source")
    @classmethod
    def _storable(cls, value: str) -> str:
        # PostgreSQL text and jsonb hold neither NUL nor unpaired surrogates (which JSON's \u
        # escapes can carry): refuse them here rather than fail in the database with a 500.
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (unpaired surrogate escape)") from None
        return value


def _error(status: int, message: str, detail: Any = None) -> HTTPException:
    body = {"error": message} if detail is None else {"error": message, "detail": detail}
    return HTTPException(status_code=status, detail=body)


def _media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()


def _limit_declared_size(request: Request, limit: int, refusal: str) -> None:
    """413 at once when the declared ``Content-Length`` is over ``limit``: nothing is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _error(413, refusal)


def _limited_receive(receive: Receive, limit: int, refusal: str) -> Receive:
    """``receive`` that answers 413 once the body passes ``limit`` bytes (a chunked body
    declares no length, so it is counted as it arrives)."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _error(413, refusal)
        return message

    return limited


async def _read_json(request: Request, limit: int) -> Any:
    """The request's JSON body: 415 if it is not JSON, 413 over ``limit`` bytes, 400 if malformed."""
    media_type = _media_type(request)
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise _error(415, "expected a JSON body (Content-Type: application/json)")
    refusal = f"request body larger than {limit} bytes"
    _limit_declared_size(request, limit, refusal)
    body = await Request(request.scope, _limited_receive(request.receive, limit, refusal)).body()
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise _error(400, "malformed JSON body", str(error)[:200]) from None


async def _same_message(connection: asyncpg.Connection, message_id: str, message: MessageIn) -> bool:
    """Whether ``message_id`` is stored already (a message sent again with its ``Idempotency-Key``),
    which must then be the same message (422 otherwise)."""
    stored = await connection.fetchrow(
        "select payload->>'role' as role, payload->>'content' as content from outbox where message_id = $1",
        message_id,
    )
    if stored is not None and (stored["role"], stored["content"]) != (message.role, message.content):
        raise _error(422, "this Idempotency-Key was used for another message in this session")
    return stored is not None


def _unsure_if_stored(key: str | None) -> HTTPException:
    advice = (
        "retry with the same Idempotency-Key: it is stored once"
        if key
        else "retry with an Idempotency-Key header next time, so a retry cannot store it twice"
    )
    return HTTPException(
        status_code=503,
        detail={"error": f"postgres is unavailable; the message may or may not have been stored; {advice}"},
        headers={"Retry-After": str(_RETRY_AFTER_SECONDS)},
    )


def _problems(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without the offending input (it may be large, and is the client's own)."""
    return [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in errors]


def _body_doc(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI description of a request body an endpoint reads itself (FastAPI cannot see it)."""
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


_MESSAGE_BODY = _body_doc("application/json", MessageIn.model_json_schema())
_FILE_FIELD = {"file": {"type": "string", "format": "binary"}}
_UPLOAD_BODY = _body_doc("multipart/form-data", {"type": "object", "properties": _FILE_FIELD, "required": ["file"]})


def _stored_filename(filename: str | None, fallback: str) -> str:
    """The client's file name without control characters (PostgreSQL refuses NUL; others garble
    listings and logs), at most 255 characters."""
    kept = "".join(char for char in (filename or "") if char.isprintable())[:255]
    return kept or fallback


def create_app() -> FastAPI:
    """Build the gateway: settings validated, telemetry set up, backends connected at start-up."""
    backends = load_backend_settings()
    settings = load_pipeline_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = aioredis.Redis.from_url(backends.redis_url, socket_timeout=5, socket_connect_timeout=2)
        app.state.pool = await connect_pool(
            backends.database_url, max_size=settings.db_pool_size, command_timeout=settings.db_command_timeout_seconds
        )
        await migrate(app.state.pool)
        app.state.health = HealthProbes(telemetry.health, {"redis": app.state.redis.ping,
                                                           "postgres": postgres_ping(app.state.pool)},
                                        timeout=_HEALTH_TIMEOUT_SECONDS)  # fmt: skip
        settings.attachment_dir.mkdir(parents=True, exist_ok=True)
        freeze_startup_objects()
        try:
            yield
        finally:
            await app.state.pool.close()
            await app.state.redis.aclose()

    app = FastAPI(title="chat gateway", lifespan=lifespan)
    telemetry = chatobs.setup(service="gateway", app=app)
    traffic = telemetry.traffic

    # Starlette's HTTPException too: unknown routes (404) and methods (405) answer in the same shape.
    @app.exception_handler(StarletteHTTPException)
    async def json_errors(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid request", "detail": _problems(exc.errors())}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client closed the connection mid-body (an upload aborted, a phone gone into a
        # tunnel): nothing was stored, nobody reads this answer, and it is no server fault to
        # count among the 5xx. 499, as nginx logs a request its client closed.
        _logger.info("%s %s: the client closed the connection before its body was read",
                     request.method, request.url.path)  # fmt: skip
        return JSONResponse({"error": "client closed the request"}, status_code=_CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A real fault (a backend down): still 500, logged by the server, but in the same JSON shape.
        return JSONResponse({"error": "internal error"}, status_code=500)

    async def backend_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Nothing was accepted (the outbox insert is the acceptance): the client may simply retry.
        backend = "redis" if type(exc).__module__.startswith("redis") else "postgres"
        _logger.warning("%s %s: %s unavailable: %r", request.method, request.url.path, backend, exc)
        return JSONResponse({"error": f"{backend} is unavailable; nothing was stored, retry shortly"},
                            status_code=503, headers={"Retry-After": str(_RETRY_AFTER_SECONDS)})  # fmt: skip

    for unavailable in BACKEND_UNAVAILABLE:
        app.add_exception_handler(unavailable, backend_unavailable)

    async def live_session(database: asyncpg.Pool | asyncpg.Connection, session_id: str) -> asyncpg.Record:
        shown = session_id if len(session_id) <= 64 else f"{session_id[:64]}..."
        if not _SESSION_ID.fullmatch(session_id):
            raise _error(404, f"no session {shown}")  # not even a well-formed id: no query
        row = await database.fetchrow("select id, tenant, deleted_at from sessions where id = $1", session_id)
        if row is None:
            raise _error(404, f"no session {shown}")
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

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, str]:
        # What a client whose event stream was refused asks next: 404 or 410, and it stops trying.
        row = await live_session(app.state.pool, session_id)
        return {"session_id": row["id"], "tenant": row["tenant"]}

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str) -> None:
        await live_session(app.state.pool, session_id)
        status = await app.state.pool.execute(
            "update sessions set deleted_at = now() where id = $1 and deleted_at is null", session_id
        )
        if status == "UPDATE 1":  # two DELETEs at once: one deleted it, the other found it deleted
            traffic.session_deleted()

    @app.post("/v1/sessions/{session_id}/messages", status_code=202, openapi_extra=_MESSAGE_BODY)
    async def post_message(session_id: str, request: Request, response: Response) -> dict[str, str]:
        received = time.perf_counter()
        # The body is read here rather than by FastAPI, so its type and size are checked before
        # it is read (413 and 415, not a 422 after buffering any amount).
        try:
            message = MessageIn.model_validate(await _read_json(request, settings.request_max_bytes))
        except ValidationError as error:
            raise _error(422, "invalid message", _problems(error.errors())) from None
        if message.role not in ROLES:
            raise _error(422, f"role must be one of {', '.join(ROLES)}")
        if len(message.content) > settings.message_max_chars:
            raise _error(413, f"message longer than {settings.message_max_chars} characters")
        key = request.headers.get("idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise _error(400, "Idempotency-Key must be 1 to 128 printable ASCII characters without spaces")
        # With a key, a retry of the same message is the same row: one reply, one budget charge.
        message_id = uuid.uuid5(_IDEMPOTENT_MESSAGES, f"{session_id}/{key}").hex if key else uuid.uuid4().hex
        stored = inserting = replayed = False
        try:
            async with app.state.pool.acquire() as connection:
                session = await live_session(connection, session_id)
                parent = traceparent()  # the publisher continues this request's trace
                payload = {
                    "message_id": message_id,
                    "session_id": session_id,
                    "tenant": session["tenant"],
                    "role": message.role,
                    "content": message.content,
                    "source": message.source,
                    "accepted_at": time.time(),
                }
                inserting = True
                # Stored only if the session is still there when the row is: FOR SHARE waits for a
                # DELETE under way and sees its outcome, and holds off one that comes next until
                # this commits. The look-up above alone let a message be accepted after the
                # session's 204, into a session nobody will read.
                inserted = await connection.fetchval(
                    "insert into outbox (message_id, session_id, payload, traceparent)"
                    " select $1, $2, $3, $4 where exists"
                    " (select from sessions where id = $2 and deleted_at is null for share)"
                    " on conflict (message_id) do nothing returning true",
                    message_id, session_id, json.dumps(payload), parent,
                )  # fmt: skip
                if not inserted:
                    if not await _same_message(connection, message_id, message):
                        raise _error(410, f"session {session_id} was deleted")
                    replayed = True
                stored = True
        except BACKEND_UNAVAILABLE:
            # PostgreSQL going away can break the connection as the pool takes it back, after the
            # insert: the message is stored then, and refusing it would make the client send it twice.
            if stored:
                _logger.warning("message %s stored; its connection broke afterwards", message_id)
            elif inserting:
                # The insert may have committed before the connection broke or the time ran out.
                raise _unsure_if_stored(key) from None
            else:
                raise
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
            return {"message_id": message_id}
        # Request received to the message stored: a refused one (404, 413, 503...) is no enqueue.
        traffic.enqueue(time.perf_counter() - received)
        traffic.message_in(role=message.role, source=message.source)
        return {"message_id": message_id}

    @app.post("/v1/sessions/{session_id}/attachments", status_code=201, openapi_extra=_UPLOAD_BODY)
    async def upload(session_id: str, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        await live_session(app.state.pool, session_id)
        if _media_type(request) != "multipart/form-data":
            raise _error(415, "expected a multipart/form-data upload with a `file` field")
        # The form parser spools files to disk: bound what it may take before it starts.
        refusal = f"attachment larger than {settings.attachment_max_bytes} bytes"
        limit = settings.attachment_max_bytes + _MULTIPART_OVERHEAD
        _limit_declared_size(request, limit, refusal)
        limited = Request(request.scope, _limited_receive(request.receive, limit, refusal))
        form = await limited.form(max_files=1, max_fields=8)
        try:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise _error(422, "the upload needs a `file` field holding the file")
            return await store_attachment(session_id, file, started)
        finally:
            await form.close()

    async def store_attachment(session_id: str, file: UploadFile, started: float) -> dict[str, Any]:
        # Media types are case-insensitive (RFC 9110 8.3.1): `Text/Plain` is text/plain.
        content_type = (file.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if content_type not in settings.attachment_types:
            raise _error(
                415, f"content type {content_type} not accepted; allowed: {', '.join(settings.attachment_types)}"
            )
        attachment_id = uuid.uuid4().hex
        directory = settings.attachment_dir / session_id
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / attachment_id
        stored = False
        try:
            size = await _store(file, path, settings.attachment_max_bytes)
            async with app.state.pool.acquire() as connection:
                await connection.execute(
                    "insert into attachments (id, session_id, filename, content_type, size_bytes, path)"
                    " values ($1, $2, $3, $4, $5, $6)",
                    attachment_id, session_id, _stored_filename(file.filename, attachment_id), content_type, size,
                    str(path),
                )  # fmt: skip
                stored = True
        except BACKEND_UNAVAILABLE:
            # As for messages: the connection can break as the pool takes it back, after the insert.
            if not stored:
                raise
            _logger.warning("attachment %s stored; its connection broke afterwards", attachment_id)
        finally:
            if not stored:
                # The client hears that nothing was stored, so nothing may be: a file no row refers to
                # would stay for good, and each retry would leave another.
                path.unlink(missing_ok=True)
        traffic.attachment_uploaded(time.perf_counter() - started)
        return {"attachment_id": attachment_id, "size_bytes": size, "content_type": content_type}

    streams = _StreamSlots(settings.sse_max_streams)

    @app.get("/v1/sessions/{session_id}/events")
    async def events(session_id: str, request: Request) -> StreamingResponse:
        # Each stream holds a Redis connection for minutes: past the cap a client waits and
        # comes back, instead of the streams taking every connection Redis will give.
        if not streams.take():
            raise HTTPException(
                status_code=503,
                detail={"error": f"{streams.limit} event streams are open, the most this gateway holds; retry shortly"},
                headers={"Retry-After": str(_RETRY_AFTER_SECONDS)},
            )
        pubsub = None
        try:
            await live_session(app.state.pool, session_id)
            pubsub = app.state.redis.pubsub()
            await pubsub.subscribe(events_channel(session_id))
        except BaseException:
            await _release(streams, pubsub)
            raise
        return _EventStream(
            _sse(pubsub, request, telemetry, settings.sse_timeout_seconds),
            release=lambda: _release(streams, pubsub),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> str:
        return resources.files("chatpipe.gateway").joinpath("static/index.html").read_text()

    @app.get("/health")
    async def health() -> JSONResponse:
        results = await app.state.health.round()
        status = 200 if all(results.values()) else 503
        return JSONResponse({name: "ok" if ok else "fail" for name, ok in results.items()}, status_code=status)

    return app


async def _store(upload: UploadFile, path: Path, limit: int) -> int:
    """Copy ``upload`` to ``path``; over ``limit`` bytes, remove it and answer 413. The copy runs in
    a worker thread: writing megabytes to disk in the event loop would hold up every other request."""
    return await run_in_threadpool(_copy_limited, upload.file, path, limit)


def _copy_limited(source: BinaryIO, path: Path, limit: int) -> int:
    """:func:`_store`'s copy, blocking: the number of bytes written."""
    size = 0
    try:
        source.seek(0)
        with path.open("wb") as out:
            while chunk := source.read(_UPLOAD_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise _error(413, f"attachment larger than {limit} bytes")
                out.write(chunk)
            # On disk before its row commits and the client is told 201: after a crash, the row
            # of an acknowledged attachment must not point at an empty or missing file. The
            # directories too: a new file's entry (and a new session directory's) is theirs.
            out.flush()
            os.fsync(out.fileno())
        for directory in (path.parent, path.parent.parent):
            _fsync_directory(directory)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
    except (asyncio.CancelledError, GeneratorExit):
        # Under uvicorn (ASGI 2.3+), Starlette notices the client gone and cancels the stream
        # before the loop's own check can: a disconnect mid-reply is counted here then.
        if replying:
            traffic.sse_stream_error("client_disconnect")
        raise
    finally:
        traffic.sse_client_disconnected()


class _StreamSlots:
    """How many SSE streams are open, up to ``limit`` (one event loop: no lock)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1


async def _release(streams: _StreamSlots, pubsub: Any) -> None:
    """A stream's slot and its Redis connection, given back once it is over (or never began)."""
    streams.give_back()
    if pubsub is None:
        return
    try:
        await pubsub.aclose()
    except Exception:  # Redis may be gone: the connection is dropped either way
        _logger.debug("closing pubsub failed", exc_info=True)


class _EventStream(StreamingResponse):
    """A stream that gives back what its handler took (a slot, a pub/sub connection) when the
    response ends, however it ends.

    Not in the generator's ``finally``: that runs only if the generator was entered, and
    neither ASGI nor Starlette promises that a response cancelled before its first chunk
    enters it (none did in the tests, clients resetting their connections at once included).
    """

    def __init__(self, content: AsyncIterator[str], *, release: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


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
