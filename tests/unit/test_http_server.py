"""The inbound HTTP middleware as an application sees it: routes behind mounts and a root path,
what a failed request's span says, and a user's error hook that fails too.

The app runs in process through httpx's ASGI transport, which builds the scope as uvicorn does
(``root_path`` prefixed to ``path``, as uvicorn 0.26 and later do with ``--root-path``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from chatobs import Telemetry, load_settings
from chatobs.instrumentation import instrument_app
from tests.metrics_text import value

DURATION = "http_server_request_duration_seconds_count"
_NO_CLIENTS = {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "httpx,redis,asyncpg,aiokafka"}


def _telemetry(exporter: InMemorySpanExporter | None = None) -> Telemetry:
    processors = [SimpleSpanProcessor(exporter)] if exporter is not None else []
    return Telemetry(load_settings(_NO_CLIENTS), service="gateway", span_processors=processors)


def _scrape(telemetry: Telemetry) -> str:
    status, _, body = telemetry.scrape(None, None)
    assert status == 200
    return body.decode()


def _get(app: FastAPI, paths: list[str], root_path: str = "") -> list[int]:
    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app, root_path=root_path, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [(await client.get(path)).status_code for path in paths]

    return asyncio.run(run())


def _post(app: FastAPI, path: str) -> int:
    async def run() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return (await client.post(path)).status_code

    return asyncio.run(run())


def _items_app(version: str) -> FastAPI:
    sub = FastAPI()

    @sub.get("/items/{item}")
    async def item(item: str) -> dict[str, str]:
        return {"version": version, "item": item}

    @sub.post("/items/special")  # after a route whose path matches too, for another method
    async def special() -> dict[str, str]:
        return {"version": version, "item": "special"}

    return sub


def test_routes_behind_mounts_keep_the_mounts_templates():
    telemetry = _telemetry()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    app.mount("/v1", _items_app("1"))
    app.mount("/v2", _items_app("2"))
    outer = FastAPI()
    outer.mount("/tenants/{tenant}", _items_app("t"))  # a mount with a path parameter of its own
    app.mount("/nested", outer)
    instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=["/health"])

    paths = ["/v1/items/a", "/v1/items/b", "/v2/items/a", "/nested/tenants/acme/items/a", "/nested/tenants/x/items/b"]
    assert _get(app, paths) == [200] * 5
    assert _post(app, "/v1/items/special") == 200
    text = _scrape(telemetry)
    assert value(text, DURATION, http_route="/v1/items/special") == 1, "the partial match was taken"
    assert value(text, DURATION, http_route="/v1/items/{item}") == 2
    assert value(text, DURATION, http_route="/v2/items/{item}") == 1
    assert value(text, DURATION, http_route="/nested/tenants/{tenant}/items/{item}") == 2
    assert value(text, DURATION, http_route="/items/{item}") == 0, "the mount prefixes were lost"
    telemetry.shutdown()


def test_excluded_paths_are_excluded_behind_a_root_path():
    telemetry = _telemetry()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=["/health"])
    # uvicorn --root-path /api: the scope's path carries the prefix, the app's routes do not.
    assert _get(app, ["/api/health", "/api/hello", "/api/health"], root_path="/api") == [200, 200, 200]
    text = _scrape(telemetry)
    assert value(text, DURATION, http_route="/health") == 0, "/health behind the root path was measured"
    assert value(text, DURATION, http_route="/hello") == 1
    telemetry.shutdown()


def test_a_failed_requests_span_says_what_failed():
    exporter = InMemorySpanExporter()
    telemetry = _telemetry(exporter)
    app = FastAPI()

    @app.get("/unavailable")
    async def unavailable() -> None:
        from fastapi import HTTPException

        raise HTTPException(503, "down")

    @app.get("/boom")
    async def boom() -> None:
        raise LookupError("the app's own")

    @app.get("/missing")
    async def missing() -> None:
        from fastapi import HTTPException

        raise HTTPException(404, "no such thing")

    instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=())
    assert _get(app, ["/unavailable", "/boom", "/missing"]) == [503, 500, 404]
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert spans["GET /unavailable"].attributes.get("error.type") == "503"
    assert spans["GET /unavailable"].status.status_code is StatusCode.ERROR
    assert spans["GET /boom"].attributes.get("error.type") == "LookupError"
    assert spans["GET /boom"].status.status_code is StatusCode.ERROR
    assert "error.type" not in spans["GET /missing"].attributes, "a 4xx is the client's, not a server error"
    telemetry.shutdown()


def test_an_error_hook_that_raises_fails_no_request(caplog: pytest.LogCaptureFixture):
    telemetry = _telemetry()
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/boom")
    async def boom() -> None:
        raise LookupError("the app's own")

    hook_calls: list[str] = []

    def broken_hook(metric: str, error: BaseException) -> None:
        hook_calls.append(metric)
        raise ValueError("the hook has a bug")

    # A tracer whose spans cannot start: the middleware's own failure goes to the hook.
    class Unstartable:
        def start_span(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("no spans today")

    instrument_app(app, Unstartable(), telemetry.cells, excluded_paths=(), on_error=broken_hook)  # type: ignore[arg-type]
    assert _get(app, ["/ok", "/boom", "/ok"]) == [200, 500, 200]
    assert hook_calls, "the hook was not called"
    assert "the hook has a bug" in caplog.text or "no spans today" in caplog.text
    telemetry.shutdown()


@pytest.mark.parametrize("raising", [ValueError("hook"), KeyError("hook")])
def test_a_recorders_error_hook_that_raises_does_not_reach_the_caller(raising: Exception):
    from chatobs.recorders.clients import ClientRecorder

    telemetry = _telemetry()
    hook_calls: list[str] = []

    def broken_hook(metric: str, error: BaseException) -> None:
        hook_calls.append(metric)
        raise raising

    clients = ClientRecorder(telemetry.instruments, telemetry.labels, broken_hook, telemetry.cells, "wal")
    record: Callable[..., None] = clients.operation
    record("redis", "get", float("nan"), failed=False)  # a bad duration: the recording fails, then its hook
    clients.bound("redis", "get").record(float("nan"), failed=False)
    assert hook_calls == ["redis_operation_seconds", "redis_operation_seconds"]
    telemetry.shutdown()


def test_a_sub_app_instrumented_too_counts_each_request_once():
    # The zero-code path instruments every FastAPI app built, sub-apps mounted into another too.
    telemetry = _telemetry()
    app = FastAPI()
    sub = _items_app("1")
    app.mount("/v1", sub)
    for each in (sub, app):
        instrument_app(each, telemetry.tracer, telemetry.cells, excluded_paths=[])
    assert _get(app, ["/v1/items/a", "/v1/items/b", "/v1/items/c"]) == [200] * 3
    text = _scrape(telemetry)
    telemetry.shutdown()
    assert value(text, DURATION, http_route="/v1/items/{item}") == 3
    assert value(text, DURATION) == 3, "the sub-app's middleware counted the requests again"


def _echo_app() -> FastAPI:
    """An app whose one route answers the baggage it sees and what it would send on."""
    from opentelemetry import baggage, propagate

    app = FastAPI()

    @app.get("/echo")
    async def echo() -> dict[str, object]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return {"baggage": dict(baggage.get_all()), "sent": carrier}

    return app


def test_a_requests_baggage_is_the_handlers_and_goes_on_with_its_calls():
    telemetry = _telemetry(InMemorySpanExporter())
    app = _echo_app()
    instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=())
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def run() -> dict[str, object]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            headers = {"traceparent": parent, "baggage": "tenant=acme"}
            return (await client.get("/echo", headers=headers)).json()

    answer = asyncio.run(run())
    telemetry.shutdown()
    assert answer["baggage"] == {"tenant": "acme"}, "the extracted baggage was dropped"
    assert answer["sent"]["baggage"] == "tenant=acme"
    assert answer["sent"]["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")


class _OtherPropagator:
    """A propagator of another format (as B3's or Jaeger's): ``x-other-trace: <trace id>-<span id>``."""

    fields = frozenset({"x-other-trace"})

    def extract(self, carrier, context=None, getter=None):  # type: ignore[no-untyped-def]
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        found = getter.get(carrier, "x-other-trace") if getter is not None else None
        if not found:
            return context
        trace_id, span_id = found[0].split("-")
        parent = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(1))
        return trace.set_span_in_context(NonRecordingSpan(parent), context)

    def inject(self, carrier, context=None, setter=None):  # type: ignore[no-untyped-def]
        pass


def test_a_trace_sent_in_another_propagators_headers_alone_is_continued():
    # OTEL_PROPAGATORS=b3multi, say: the caller sends those headers only, and the server span
    # must continue its trace, not start a new one.
    from opentelemetry import propagate

    before = propagate.get_global_textmap()
    propagate.set_global_textmap(_OtherPropagator())  # type: ignore[arg-type]
    exporter = InMemorySpanExporter()
    telemetry = _telemetry(exporter)
    app = _echo_app()
    instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=())

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            headers = {"x-other-trace": "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"}
            assert (await client.get("/echo", headers=headers)).status_code == 200

    try:
        asyncio.run(run())
    finally:
        propagate.set_global_textmap(before)
        telemetry.shutdown()
    (span,) = exporter.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c", "a new root trace"
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "b7ad6b7169203331"


def test_an_app_instrumented_from_its_lifespan_is_measured_and_scraped():
    # Starlette refuses middleware once the app has started, and the lifespan runs after that:
    # telemetry made there must still measure the requests, and serve them on the app's /metrics.
    import contextlib
    import socket
    import threading
    import time

    import uvicorn

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        telemetry = _telemetry()
        telemetry.mount(app)
        assert "fastapi" in telemetry.instrument(app)
        yield
        telemetry.shutdown()

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/items/{item}")
    async def item(item: str) -> dict[str, str]:
        return {"item": item}

    listening = socket.create_server(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{listening.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    serving = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    serving.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert serving.is_alive() and time.monotonic() < deadline, "uvicorn did not start (the lifespan failed?)"
            time.sleep(0.02)
        with httpx.Client(base_url=base) as client:
            assert [client.get(f"/v1/items/{n}").status_code for n in range(3)] == [200] * 3
            scrape = client.get("/metrics")
    finally:
        server.should_exit = True
        serving.join(30)
        listening.close()
    assert scrape.status_code == 200
    assert value(scrape.text, DURATION, http_route="/v1/items/{item}", http_response_status_code="200") == 3


def test_the_scrape_path_takes_the_apps_get_route_there_and_leaves_its_other_methods():
    """A ``/metrics`` the app already served is chatobs's now; a route there for other methods only
    (``POST /v1/sessions`` under a mistaken ``CHATOBS_METRICS_PATH``) is the app's API, and stays."""
    telemetry = Telemetry(load_settings({**_NO_CLIENTS, "CHATOBS_METRICS_PATH": "/v1/sessions"}), service="gateway")
    app = FastAPI()

    @app.get("/v1/sessions")
    async def old_metrics() -> str:
        return "the app's own"

    @app.post("/v1/sessions", status_code=201)
    async def create() -> dict[str, str]:
        return {"session": "s1"}

    telemetry.mount(app)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.post("/v1/sessions"), await client.get("/v1/sessions")

    created, scraped = asyncio.run(run())
    assert (created.status_code, created.json()) == (201, {"session": "s1"})
    assert scraped.status_code == 200 and "# TYPE chat_messages_in_total counter" in scraped.text
    telemetry.shutdown()


def test_a_baggage_header_past_w3cs_limit_is_ignored_without_writing_it_to_the_log(caplog):
    # The baggage propagator ignores it too, but logged all of it: 400 KB of log per request.
    telemetry = _telemetry(InMemorySpanExporter())
    app = _echo_app()
    instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=())

    async def run(baggage: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.get("/echo", headers={"baggage": baggage})

    with caplog.at_level(logging.DEBUG):
        oversized = asyncio.run(run("k=" + "v" * 400_000))
        within = asyncio.run(run("tenant=acme," + "k=" + "v" * 8_000))  # 8,012 bytes: kept
    telemetry.shutdown()
    assert oversized.status_code == 200 and oversized.json()["baggage"] == {}
    assert within.json()["baggage"]["tenant"] == "acme"
    assert max((len(record.getMessage()) for record in caplog.records), default=0) < 1_000
