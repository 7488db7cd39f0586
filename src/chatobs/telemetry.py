"""The per-service handle (:class:`Telemetry`) and the one-call bootstrap (:func:`setup`).

Example::

    from fastapi import FastAPI
    import chatobs

    app = FastAPI()
    telemetry = chatobs.setup(service="gateway", app=app)   # /metrics is live
    telemetry.traffic.message_in(role="user", source="web")
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import anyio.to_thread
from opentelemetry import metrics, trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import MetricReader, MetricsData
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NoOpTracerProvider, Span

from chatobs.cells import CellStore, LocalCells, with_produced
from chatobs.exposition import Renderer, ScrapeReader, scrape_response
from chatobs.instrumentation import (
    consumer_span,
    instrument_app,
    instrument_libraries,
    uninstrument_app,
    uninstrument_libraries,
)
from chatobs.instruments import Instruments, views
from chatobs.labels import LabelPolicy
from chatobs.multiprocess import ProcessDirectory
from chatobs.process import register_process_metrics
from chatobs.provider import (
    ExportAccounting,
    PushExporters,
    build_metric_readers,
    build_resource,
    build_tracer_provider,
)
from chatobs.recorders import (
    BacklogRecorder,
    BudgetRecorder,
    ClientRecorder,
    HealthRecorder,
    LLMRecorder,
    SomabrainRecorder,
    ToolRecorder,
    TrafficRecorder,
)
from chatobs.server import MetricsAuth, MetricsServer, mount_metrics_route, vacate_path
from chatobs.settings import ConfigError, Settings, load_settings
from chatobs.version import __version__

__all__ = ["Telemetry", "current", "setup"]

_logger = logging.getLogger("chatobs")
#: Binding errors that mean the host is wrong (asyncio re-raises a failed lookup as a plain
#: OSError with the lookup's code): a name that does not resolve, an address not of this machine.
_HOST_ERRORS = frozenset({errno.EADDRNOTAVAIL, socket.EAI_NONAME, socket.EAI_AGAIN, socket.EAI_FAIL})

#: Instrumentation scope of the catalogue instruments.
SCOPE_NAME = "chatobs"

_EXEMPLAR_FILTERS = {
    "always_on": AlwaysOnExemplarFilter,
    "always_off": AlwaysOffExemplarFilter,
    "trace_based": TraceBasedExemplarFilter,
}


class Telemetry:
    """Metrics and traces of one service, built from validated settings.

    Build one directly in tests (``set_global=False`` leaves the process-wide
    providers alone); services call :func:`setup`, which builds one per process.

    Attributes:
        traffic, llm, somabrain, backlog, budgets, health, tools, clients: the typed recorders
            (``clients`` is fed by the client instrumentors).
        meter_provider, tracer_provider: the SDK providers (for instrumentations).

    ``metric_readers`` are added to the meter provider as they are: they see the SDK's
    instruments (other meters'), not chatobs's catalogue metrics, which are kept in cells
    and reach OTLP through ``OTEL_METRICS_EXPORTER`` and Prometheus through :meth:`scrape`.
    ``span_processors`` receive every recorded span.

    Example::

        telemetry = Telemetry(load_settings(env), service="worker")
        telemetry.llm.request("m", "p")
        status, headers, body = telemetry.scrape("application/openmetrics-text", None)
        telemetry.shutdown()
    """

    def __init__(
        self,
        settings: Settings,
        *,
        service: str | None = None,
        set_global: bool = False,
        metric_readers: Sequence[MetricReader] = (),
        span_processors: Iterable[SpanProcessor] = (),
    ):
        role = service or settings.chatobs.service
        if role is None:
            raise ConfigError({"CHATOBS_SERVICE": ": not set; set it or pass setup(service=...)"})
        self.settings = settings.with_service(role)
        self.service = role
        self.disabled = settings.otel.sdk_disabled
        self._servers: list[MetricsServer] = []
        self._mounted: set[int] = set()
        #: The apps this handle instrumented: its shutdown takes its middleware away from them.
        self._apps: list[Any] = []
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False
        self._shutdown_finished = threading.Event()
        options = self.settings.chatobs

        self.labels = LabelPolicy(options, on_reject=self._label_rejected)
        # Several worker processes behind one scrape: write through to, and combine from, a shared directory.
        self._directory = (
            ProcessDirectory(options.multiprocess_dir) if options.multiprocess_dir and not self.disabled else None
        )
        self.cells = CellStore(
            self.labels, self._label_rejected, settings.otel.metrics_exemplar_filter, directory=self._directory
        )
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)
        self._resource = build_resource(self.settings, role)
        self.instruments = Instruments()
        self.scrape_reader: ScrapeReader | None = None
        self._pushes = PushExporters()  # what a shutdown that gives up waiting stops at once
        if self.disabled:
            self.meter_provider: Any = NoOpMeterProvider()
            self.tracer_provider: Any = NoOpTracerProvider()
        else:
            accounting = ExportAccounting(self._export_failed, self._spans_dropped)
            readers = list(metric_readers) + build_metric_readers(
                self.settings, self._with_produced, accounting, self._pushes
            )
            if "prometheus" in settings.otel.metrics_exporter:
                # One process: a scrape renders its cells (`_local_cells`) and the callbacks'
                # readings as they are. Several processes' files: all is produced as points.
                self.scrape_reader = (
                    ScrapeReader(produce=self._with_produced)
                    if self.cells.combines_files
                    else ScrapeReader(read=self.instruments.readings)
                )
                readers.append(self.scrape_reader)
            self.meter_provider = MeterProvider(
                metric_readers=readers,
                resource=self._resource,
                views=views(settings=options),
                exemplar_filter=_EXEMPLAR_FILTERS[settings.otel.metrics_exemplar_filter](),
                shutdown_on_exit=False,  # shutdown() below, or the atexit hook setup() installs
            )
            self.tracer_provider = build_tracer_provider(self.settings, self._resource, accounting, self._pushes)
            for processor in span_processors:
                self.tracer_provider.add_span_processor(processor)
        self._renderer = Renderer(
            role,
            target_info=options.expose_target_info,
            scope_labels=options.expose_scope_labels,
            uncatalogued=options.expose_uncatalogued,
            resource=self._resource,
        )

        self._logged_errors: set[str] = set()
        recorder_args = (self.instruments, self.labels, self._recording_failed, self.cells)
        self.traffic = TrafficRecorder(*recorder_args)
        self.llm = LLMRecorder(*recorder_args)
        self.somabrain = SomabrainRecorder(*recorder_args)
        self.backlog = BacklogRecorder(*recorder_args)
        self.budgets = BudgetRecorder(*recorder_args)
        self.health = HealthRecorder(*recorder_args)
        self.tools = ToolRecorder(*recorder_args)
        self.clients = ClientRecorder(*recorder_args, wal_topic=options.wal_topic)
        if options.process_metrics:
            pids = self.cells.live_pids if self._directory is not None else None
            register_process_metrics(self.instruments, options.data_dir, pids)
        self.tracer = self.tracer_provider.get_tracer(SCOPE_NAME, __version__)
        #: What a scrape must present (``CHATOBS_METRICS_BEARER_TOKEN*``/``_BASIC_AUTH_*``), on the app
        #: route and the standalone server alike; ``None``: nothing.
        self.metrics_auth = MetricsAuth.from_settings(options, on_refused=self._scrape_refused)

        if set_global:
            self.make_global()

    def make_global(self) -> None:
        """Make this handle's providers the process-wide ones (what instrumentations use)."""
        if self.disabled:
            return
        metrics.set_meter_provider(self.meter_provider)
        trace.set_tracer_provider(self.tracer_provider)
        if metrics.get_meter_provider() is not self.meter_provider:
            _logger.warning("chatobs: another MeterProvider was already global; instrumentations will use it")

    # -- self-metrics ----------------------------------------------------------
    def _label_rejected(self, metric_name: str, label_name: str) -> None:
        # Both values are catalogue names, so this cannot itself overflow.
        self.cells.add("chatobs_label_rejections_total", 1, (metric_name, label_name))

    def _scrape_refused(self) -> None:
        self.cells.add("chatobs_scrapes_refused_total", 1, ())

    def _export_failed(self, signal: str) -> None:
        with contextlib.suppress(Exception):  # runs on the SDK's export thread: never raise there
            self.cells.add("chatobs_export_failures_total", 1, (signal,))

    def _spans_dropped(self, reason: str, count: int) -> None:
        with contextlib.suppress(Exception):  # as above
            self.cells.add("chatobs_spans_dropped_total", count, (reason,))

    def _recording_failed(self, metric_name: str, exc: BaseException) -> None:
        try:
            self.cells.add("chatobs_recording_errors_total", 1, (metric_name,))
            if metric_name not in self._logged_errors:  # once per metric: no log floods
                self._logged_errors.add(metric_name)
                _logger.warning("chatobs: recording %s failed: %r (further failures counted only)", metric_name, exc)
        except Exception:  # noqa: BLE001, S110 - the error path itself must not raise either
            pass

    # -- exposition --------------------------------------------------------------
    def scrape(
        self, accept: str | None = None, accept_encoding: str | None = None, names: Collection[str] | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One scrape: ``(status, headers, body)``, negotiated from the request headers; with
        ``names`` (a request's ``name[]``), only the families that have one of them as their
        name or a sample's name.

        >>> telemetry = Telemetry(load_settings({}), service="gateway")
        >>> status, headers, body = telemetry.scrape(names={"sessions_created_total"})
        >>> [line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")]
        ['sessions_created_total']
        >>> telemetry.shutdown()
        """
        if self.scrape_reader is None:
            # Prometheus export is off (OTEL_METRICS_EXPORTER) or the SDK is disabled.
            return 404, {"Content-Type": "text/plain; charset=utf-8"}, b"Prometheus export is disabled\n"
        self.cells.refresh()  # one read of every worker's values, shared by this collection's callbacks
        return scrape_response(
            self.scrape_reader,
            self._renderer,
            accept,
            accept_encoding,
            self.settings.chatobs.scrape_timeout_seconds,
            local=self._local_cells,
            names=names,
        )

    def _local_cells(self) -> LocalCells | None:
        return self.cells.local_cells(self._scope)

    def _with_produced(self, data: MetricsData | None) -> MetricsData | None:
        """``data`` (what the SDK collected: other meters' instruments) plus chatobs's own metrics,
        produced as the catalogue's Views would: the cells' counters, gauges and histograms and
        the observable metrics' callbacks."""
        produced = [*self.cells.produced_metrics(), *self.instruments.produced_metrics()]
        return with_produced(data, produced, self._scope, self._resource)

    def mount(self, app: Any) -> None:
        """Serve the scrape at ``CHATOBS_METRICS_PATH`` on a FastAPI/Starlette app (idempotent), and
        push what the exporters hold when the app stops (see :meth:`_flush_when_app_stops`).

        With ``CHATOBS_METRICS_ON_APP=false`` the scrape is served only on the standalone
        server's port: the app gets no route, and a GET route the app itself had at that path
        is removed too, so the public port answers 404 there like on any unknown path (a route
        there for other methods only is the app's API, and stays).
        """
        if id(app) in self._mounted:
            return
        options = self.settings.chatobs
        self._flush_when_app_stops(app)
        if options.metrics_on_app:
            mount_metrics_route(app, options.metrics_path, self.scrape, self.metrics_auth)
        else:
            vacate_path(app, options.metrics_path, "CHATOBS_METRICS_ON_APP=false")
        self._mounted.add(id(app))

    def _flush_when_app_stops(self, app: Any) -> None:
        """Wrap the app's lifespan so that its end flushes the push exporters (bounded).

        The atexit hook is not enough under uvicorn: after its graceful stop on SIGTERM it raises
        the signal again, and a process ended by a signal runs no atexit hook, so the last spans
        and metric push would be lost. The lifespan ends after the last request finished.
        """
        router = getattr(app, "router", None)
        original = getattr(router, "lifespan_context", None)
        if original is None:
            return
        timeout_millis = int(self.settings.chatobs.shutdown_timeout_seconds * 1000)

        @contextlib.asynccontextmanager
        async def lifespan(lifespan_app: Any) -> AsyncIterator[Any]:
            try:
                async with original(lifespan_app) as state:
                    yield state
            finally:
                await anyio.to_thread.run_sync(self.force_flush, timeout_millis)

        router.lifespan_context = lifespan

    def serve(self, port: int | None = None, host: str | None = None) -> MetricsServer:
        """Start a standalone metrics server (default: ``CHATOBS_METRICS_HOST``/``_PORT``)."""
        options = self.settings.chatobs
        port = options.metrics_port if port is None else port
        if port is None:
            raise ConfigError({"CHATOBS_METRICS_PORT": ": not set; a service without an HTTP app needs it"})
        host = host or options.metrics_host
        try:
            server = MetricsServer(self.scrape, host=host, port=port, path=options.metrics_path, auth=self.metrics_auth)
        except OSError as error:
            # A name that does not resolve, or an address not of this machine: the host is wrong.
            wrong_host = error.errno in _HOST_ERRORS or isinstance(error, socket.gaierror)
            variable, given = ("CHATOBS_METRICS_HOST", host) if wrong_host else ("CHATOBS_METRICS_PORT", port)
            raise ConfigError({variable: f"={given}: cannot listen on {host}:{port}: {error.strerror}"}) from error
        self._servers.append(server)
        _logger.info("chatobs: %s metrics at %s", self.service, server.url)
        return server

    # -- instrumentation -------------------------------------------------------------
    def instrument(self, app: Any = None) -> list[str]:
        """Instrument httpx, redis, asyncpg and aiokafka (process-wide) and, given one, a FastAPI app,
        with this handle's providers; returns the library names instrumented. Idempotent.

        ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` switches any of them off. A handle that was shut
        down instruments nothing (with a warning): its shutdown, done already, would never undo it.
        """
        if self.disabled:
            return []
        if self._is_shut_down:
            _logger.warning("chatobs: instrument() on a %s handle that was shut down: nothing instrumented",
                            self.service)  # fmt: skip
            return []
        disabled = set(self.settings.otel.python_disabled_instrumentations)
        names = instrument_libraries(self.tracer_provider, self.clients, disabled)
        if app is not None and "fastapi" not in disabled:
            options = self.settings.chatobs
            # Off the app, the metrics path is an unknown path like any other, and counted like one.
            scrape_paths = [options.metrics_path] if options.metrics_on_app else []
            if instrument_app(app, self.tracer, self.cells, [*scrape_paths, *options.health_paths],
                              self._recording_failed):  # fmt: skip
                self._apps.append(app)
            if any(app is ours for ours in self._apps):  # else another handle's, which it stays
                names.append("fastapi")
        return names

    def consumer_span(self, record: Any) -> AbstractContextManager[Span]:
        """``with telemetry.consumer_span(record):`` continues the producer's trace while handling a
        Kafka record (context from its headers)."""
        return consumer_span(self.tracer, record)

    # -- lifecycle -----------------------------------------------------------------
    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        """Push whatever the push exporters hold (OTLP metrics, batched spans); False if that
        did not finish within ``timeout_millis`` (the SDK's span flush ignores its timeout, so
        the bound is kept here)."""
        if self.disabled:
            return True
        outcome: list[bool] = []

        def flush() -> None:
            ok = self.meter_provider.force_flush(timeout_millis)
            outcome.append(bool(self.tracer_provider.force_flush(timeout_millis)) and bool(ok))

        return _run_bounded(flush, timeout_millis / 1000, "force_flush") and all(outcome)

    def shutdown(self, timeout_millis: int | None = None) -> None:
        """Flush and stop: push exporters send their last data, servers close, and the client
        libraries and apps this handle instrumented are uninstrumented (so another handle can).
        Idempotent.

        Bounded by ``timeout_millis`` (default ``CHATOBS_SHUTDOWN_TIMEOUT_SECONDS``): with the
        collector unreachable or silent, the last push is given up rather than holding the
        stopping process (the SDK's own waits add up to tens of seconds).
        """
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
        try:
            self._shut_down(timeout_millis)
        finally:
            self._shutdown_finished.set()

    def _shut_down(self, timeout_millis: int | None) -> None:
        budget = self.settings.chatobs.shutdown_timeout_seconds if timeout_millis is None else timeout_millis / 1000
        deadline = time.monotonic() + budget  # one budget for all of it: a scrape in progress included
        for server in self._servers:
            server.stop(timeout=deadline - time.monotonic())
        if self.disabled:
            return
        try:
            uninstrument_libraries(self.clients)
        except Exception:  # the last push still goes
            _logger.warning("chatobs: uninstrumenting failed", exc_info=True)
        for app in self._apps:  # its next handle (a second lifespan, say) instruments it afresh
            try:
                uninstrument_app(app)
            except Exception:  # as above
                _logger.warning("chatobs: uninstrumenting an app failed", exc_info=True)
        seconds = max(0.0, deadline - time.monotonic())

        def flush_and_stop() -> None:
            # Traces first: ending the span batches may still count failures the last metric push reports.
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown(timeout_millis=seconds * 1000)

        if not _run_bounded(flush_and_stop, seconds, "shutdown"):
            _logger.warning("chatobs: the last OTLP push did not finish within %.1fs (collector unreachable?); "
                            "stopping without it", budget)  # fmt: skip
            self._pushes.shut_down_now()  # else they retry, and log, until the OTLP timeout
        if self._directory is not None:
            self._directory.close()  # the file stays: this process's counts still count


def _run_bounded(work: Callable[[], None], seconds: float, what: str) -> bool:
    """Run ``work`` on a daemon thread and wait at most ``seconds``; True if it finished.

    A thread left behind is waiting on an exporter: the caller stops the exporters
    (:class:`~chatobs.provider.PushExporters`), which ends their retries; a push blocked on a
    silent socket ends at its timeout, or with the process.
    """
    finished = threading.Event()

    def run() -> None:
        try:
            work()
        except Exception:
            _logger.warning("chatobs: %s failed", what, exc_info=True)
        finally:
            finished.set()

    try:
        threading.Thread(target=run, name=f"chatobs-{what}", daemon=True).start()
    except RuntimeError:  # no new threads this late in interpreter shutdown: run it here, unbounded
        run()
    return finished.wait(max(0.0, seconds))


_setup_lock = threading.Lock()
_current: Telemetry | None = None


def setup(
    service: str | None = None, app: Any = None, *, env: Mapping[str, str] | None = None, instrument: bool = True
) -> Telemetry:
    """Bootstrap this process's telemetry from the environment; idempotent.

    The first call validates every setting (raising :class:`ConfigError` naming
    any bad variable), builds the providers, makes them global so that
    OpenTelemetry instrumentations use them, and starts the standalone metrics
    server when ``CHATOBS_METRICS_PORT`` is set. It instruments httpx, redis,
    asyncpg and aiokafka, and ``app`` when given (``instrument=False``: leave that
    to ``opentelemetry-instrument``). Later calls return the same handle; passing
    ``app`` mounts ``/metrics`` on it and instruments it. Once that handle is shut down
    (an app's lifespan ended, and another starts in the same process), the next call
    builds a new one; OpenTelemetry's global providers stay the first handle's (they are
    set once per process), so only chatobs's own instrumentation records into the new one.

    Example::

        app = FastAPI()
        telemetry = chatobs.setup(service="gateway", app=app)

        # a worker without HTTP, CHATOBS_METRICS_PORT=9464:
        telemetry = chatobs.setup(service="worker")
    """
    return _set_up(service, app, env, instrument, zero_code=False)


def _set_up(service: str | None, app: Any, env: Mapping[str, str] | None, instrument: bool, *,
            zero_code: bool) -> Telemetry:  # fmt: skip
    """:func:`setup`; ``zero_code``: called by ``opentelemetry-instrument``'s configurator, which
    mounts the scrape on each FastAPI app as it is built (so no app now is no warning)."""
    global _current
    with _setup_lock:
        if _current is not None and _current._is_shut_down:
            # One shutting down in another thread: its libraries and port are taken until it is done.
            _current._shutdown_finished.wait(_current.settings.chatobs.shutdown_timeout_seconds + 1)
        if _current is None or _current._is_shut_down:
            first = _current is None
            settings = load_settings(env)
            telemetry = Telemetry(settings, service=service)
            if settings.chatobs.metrics_port is not None:
                # Served even with Prometheus export off: the port then says so (404) instead of refusing.
                try:
                    telemetry.serve()
                except BaseException:
                    telemetry.shutdown()  # nothing half-built stays behind, nothing was made global
                    raise
            elif app is None and telemetry.scrape_reader is not None:
                if zero_code:
                    _logger.info("chatobs: CHATOBS_METRICS_PORT unset: /metrics is served on each FastAPI app "
                                 "as it is built, and nowhere else")  # fmt: skip
                else:
                    _logger.warning("chatobs: no app given and CHATOBS_METRICS_PORT unset: nothing serves "
                                    "/metrics until telemetry.mount(app) or telemetry.serve() is called")  # fmt: skip
            if first:
                telemetry.make_global()
            else:
                _logger.info("chatobs: setup() after the %s handle was shut down: a new one, not made global "
                             "(OpenTelemetry sets its global providers once)", _current.service)  # fmt: skip
            atexit.register(telemetry.shutdown)
            _current = telemetry
        elif service is not None and service != _current.service:
            _logger.warning("chatobs: setup(service=%r) ignored: already set up as %r", service, _current.service)
        if app is not None:
            _current.mount(app)
        if instrument:
            _current.instrument(app)
        return _current


def current() -> Telemetry | None:
    """The handle :func:`setup` built in this process, if any.

    Example::

        telemetry = chatobs.current()  # in code that did not call setup() itself
        if telemetry is not None:
            telemetry.llm.request("gpt-4o-mini", "openai")
    """
    return _current
