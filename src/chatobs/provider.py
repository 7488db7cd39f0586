"""Assemble the OpenTelemetry SDK from settings: Resource, metric readers, TracerProvider.

Each builder takes validated :class:`~chatobs.settings.Settings` and returns
fresh SDK objects; nothing here touches global state, so tests build as many
independent pipelines as they like.

Example::

    >>> from chatobs.settings import load_settings
    >>> settings = load_settings({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=dev"})
    >>> build_resource(settings, "gateway").attributes["service.name"]
    'gateway'
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from chatobs.multiprocess import renew_in_forked_child
from chatobs.settings import OtelSettings, Settings
from chatobs.tracing import DecidedByParent, LeanTracerProvider

__all__ = [
    "AccountedSpanExporter",
    "BoundedBatchSpanProcessor",
    "ExportAccounting",
    "ExportBackoff",
    "ProducingExporter",
    "PushExporters",
    "PushReader",
    "SdkTracerProvider",
    "build_metric_readers",
    "build_resource",
    "build_sampler",
    "build_tracer_provider",
]

_logger = logging.getLogger("chatobs")


@dataclass(frozen=True)
class ExportAccounting:
    """Where telemetry that never reached the collector is counted (the handle's self-metrics).

    ``export_failed(signal)``: one OTLP export (``metrics`` or ``traces``) failed after the
    exporter's own retries. ``spans_dropped(reason, count)``: spans lost, because the batch
    queue was full (``queue_full``) or their export failed (``export_failed``).
    Neither may raise: they run on the SDK's export threads.
    """

    export_failed: Callable[[str], None]
    spans_dropped: Callable[[str, int], None]


NO_ACCOUNTING = ExportAccounting(lambda signal: None, lambda reason, count: None)


class PushExporters:
    """The push exporters of one telemetry, so that a shutdown which stops waiting can stop them.

    The SDK shuts an exporter down only after its last export returned, and an OTLP exporter
    retries a refused push with backoff until its timeout (10 s by default). A shutdown that
    gives up waiting would leave that thread retrying, and logging each retry, after it
    returned. :meth:`shut_down_now` shuts every exporter down at once, which ends the retries;
    a push blocked on a silent socket still ends only at its timeout.

    Example::

        pushes = PushExporters()
        readers = build_metric_readers(settings, pushes=pushes)
        ...
        if not finished_in_time:
            pushes.shut_down_now()
    """

    def __init__(self) -> None:
        self._exporters: list[SpanExporter | MetricExporter] = []

    def add(self, exporter: SpanExporter | MetricExporter) -> None:
        self._exporters.append(exporter)

    def shut_down_now(self) -> None:
        for exporter in self._exporters:
            try:
                exporter.shutdown()
            except Exception:  # giving up already: an exporter that fails to stop is left as it is
                _logger.debug("chatobs: shutting an exporter down failed", exc_info=True)


class _Once:
    """Runs a call the first time only: an exporter is shut down early by a shutdown that gave up
    waiting (:class:`PushExporters`), then again by the SDK, whose second call would log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False

    def __call__(self, call: Callable[[], object]) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        call()


#: After a failed export, the next one waits this long, doubling per failure up to the maximum.
_EXPORT_BACKOFF_FIRST_SECONDS = 1.0
_EXPORT_BACKOFF_MAX_SECONDS = 30.0


class ExportBackoff:
    """When the collector is known to be down, skip exports instead of attempting them.

    An export to a dead collector costs the exporter its whole timeout (a silent socket) or a
    round of retries, and it serializes the batch first: tens of milliseconds of CPU that
    the request threads wait for. After a failure, exports are skipped (their data counted
    as lost) for a backoff that doubles per failure, from 1 s up to 30 s; the first export
    after it is the probe that finds the collector back.
    """

    def __init__(self, first: float = _EXPORT_BACKOFF_FIRST_SECONDS, maximum: float = _EXPORT_BACKOFF_MAX_SECONDS):
        self._first = first
        self._maximum = maximum
        self._delay = 0.0
        self._next_attempt = 0.0

    def allow(self) -> bool:
        return time.monotonic() >= self._next_attempt

    def failed(self) -> None:
        self._delay = min(self._maximum, max(self._first, self._delay * 2))
        self._next_attempt = time.monotonic() + self._delay

    def succeeded(self) -> None:
        self._delay = 0.0
        self._next_attempt = 0.0

    def attempt(self, export: Callable[[], bool], signal: str) -> bool:
        """Run ``export`` (True: the collector took it) unless the collector is known down; an
        exception counts as a failure. Whether the data reached the collector."""
        if not self.allow():
            return False
        try:
            ok = export()
        except Exception:
            _logger.debug("chatobs: %s export raised", signal, exc_info=True)
            ok = False
        if ok:
            self.succeeded()
        else:
            self.failed()
        return ok


def build_resource(settings: Settings, service: str) -> Resource:
    """Resource from ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` (which wins),
    defaulting ``service.name`` to the service role."""
    attributes: dict[str, str] = dict(settings.otel.resource_attribute_map)
    attributes[SERVICE_NAME] = settings.otel.service_name or attributes.get(SERVICE_NAME) or service
    return Resource.create(attributes)


def _otlp_target(otel: OtelSettings, signal: str) -> tuple[str, str | None]:
    """(protocol, endpoint) for ``signal`` ("metrics" or "traces"), per-signal variables first."""
    protocol = getattr(otel, f"exporter_otlp_{signal}_protocol") or otel.exporter_otlp_protocol
    endpoint = getattr(otel, f"exporter_otlp_{signal}_endpoint")
    if endpoint is not None:
        return protocol, str(endpoint)
    if otel.exporter_otlp_endpoint is None:
        return protocol, None  # the exporter's own default (localhost:4317/4318)
    base = str(otel.exporter_otlp_endpoint)
    if protocol == "grpc":
        return protocol, base.rstrip("/")
    # The specification: the generic endpoint is a base URL; HTTP appends the signal path to its
    # path (a query, `?api-key=...`, stays after it rather than swallowing it).
    url = urlsplit(base)
    return protocol, urlunsplit(url._replace(path=f"{url.path.rstrip('/')}/v1/{signal}"))


def _otlp_timeout_seconds(otel: OtelSettings, signal: str) -> float:
    """``OTEL_EXPORTER_OTLP[_{signal}]_TIMEOUT`` (milliseconds, as the specification says) in seconds.

    Passed explicitly because the Python exporters read those variables as *seconds*: the
    specification's ``10000`` would let one export to a dead collector hang for hours.
    """
    millis = getattr(otel, f"exporter_otlp_{signal}_timeout") or otel.exporter_otlp_timeout
    return millis / 1000


def _otlp_metric_exporter(otel: OtelSettings):
    protocol, endpoint = _otlp_target(otel, "metrics")
    options: dict[str, Any] = {
        "headers": otel.otlp_headers_for("metrics") or None,
        "timeout": _otlp_timeout_seconds(otel, "metrics"),
    }
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, **options)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter(endpoint=endpoint, **options)


def _otlp_span_exporter(otel: OtelSettings) -> SpanExporter:
    protocol, endpoint = _otlp_target(otel, "traces")
    options: dict[str, Any] = {
        "headers": otel.otlp_headers_for("traces") or None,
        "timeout": _otlp_timeout_seconds(otel, "traces"),
    }
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, **options)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint, **options)


class ProducingExporter(MetricExporter):
    """Hands each export to ``inner`` with the metrics ``augment`` adds (the histogram cells,
    which have no SDK instrument), and counts the exports that fail in ``accounting``.
    Temporality is cumulative, as on ``/metrics``, so the next successful push carries what a
    failed one lost."""

    def __init__(
        self,
        inner: MetricExporter,
        augment: Callable[[MetricsData | None], MetricsData | None] | None = None,
        accounting: ExportAccounting = NO_ACCOUNTING,
    ):
        super().__init__()
        self._inner = inner
        self._augment = augment
        self._accounting = accounting
        self._backoff = ExportBackoff()
        self._shutdown = _Once()

    def ready(self) -> bool:
        """False while the collector is known down (the backoff after a failed export)."""
        return self._backoff.allow()

    def lost(self) -> None:
        """A push that did not reach the collector (failed, or given up while it is down): counted."""
        self._accounting.export_failed("metrics")

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        def push() -> bool:
            data = (self._augment(metrics_data) if self._augment else None) or metrics_data
            return self._inner.export(data, timeout_millis=timeout_millis, **kwargs) is MetricExportResult.SUCCESS

        # Skipped while the collector is down: the next push after the backoff carries the totals.
        if self._backoff.attempt(push, "metric"):
            return MetricExportResult.SUCCESS
        self.lost()
        return MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._shutdown(lambda: self._inner.shutdown(timeout_millis=timeout_millis, **kwargs))


class PushReader(PeriodicExportingMetricReader):
    """The SDK's periodic push reader, except that it does not collect while its exporter
    backs off from a collector known to be down: a collection reads every metric (a few
    milliseconds of the service's time, on its request latency) for a push that would be
    dropped unsent. Nothing is lost: temporality is cumulative, so the next push carries the
    totals.

    Example::

        reader = PushReader(ProducingExporter(OTLPMetricExporter()), export_interval_millis=60_000)
    """

    def __init__(self, exporter: ProducingExporter, **kwargs: Any):
        super().__init__(exporter, **kwargs)
        self._producing = exporter
        self._collecting = threading.Lock()  # the export thread and force_flush may both collect
        self._received = False

    def collect(self, timeout_millis: float = 10_000) -> None:
        if not self._producing.ready():
            self._producing.lost()
            return
        with self._collecting:
            self._received = False
            super().collect(timeout_millis=timeout_millis)
            if not self._received:
                # The SDK hands nothing over when its own instruments have no data, but the
                # exporter adds chatobs's metrics (produced from the cells) to every export.
                super()._receive_metrics(MetricsData(resource_metrics=[]), timeout_millis=timeout_millis)

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        self._received = True
        super()._receive_metrics(metrics_data, timeout_millis=timeout_millis, **kwargs)


def build_metric_readers(
    settings: Settings,
    augment: Callable[[MetricsData | None], MetricsData | None] | None = None,
    accounting: ExportAccounting = NO_ACCOUNTING,
    pushes: PushExporters | None = None,
) -> list[MetricReader]:
    """Push readers for ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``), each exporter given
    what ``augment`` adds to every export, its failures counted in ``accounting``, and added
    to ``pushes``.

    The ``prometheus`` exporter is the pull :class:`~chatobs.exposition.ScrapeReader`,
    which the caller adds because it also serves it.
    """
    otel = settings.otel
    readers: list[MetricReader] = []
    push = {"otlp": _otlp_metric_exporter, "console": lambda _: ConsoleMetricExporter()}
    for name in otel.metrics_exporter:
        if name in push:
            exporter = ProducingExporter(push[name](otel), augment, accounting)
            readers.append(PushReader(exporter, export_interval_millis=otel.metric_export_interval,
                                      export_timeout_millis=otel.metric_export_timeout))  # fmt: skip
            if pushes is not None:
                pushes.add(exporter)
    return readers


def build_sampler(otel: OtelSettings) -> Sampler:
    """The ``OTEL_TRACES_SAMPLER`` sampler. ``always_on``/``always_off``, alone or under
    ``parentbased_``, decide by the parent's flags and the span's kind alone, so they come as
    :class:`~chatobs.tracing.DecidedByParent` (the lean tracer reads their decisions from a table)."""
    name = otel.traces_sampler
    root_name = name.removeprefix("parentbased_")
    root: Sampler
    if root_name == "always_on":
        root = ALWAYS_ON
    elif root_name == "always_off":
        root = ALWAYS_OFF
    else:
        root = TraceIdRatioBased(otel.traces_sampler_arg)
    sampler = ParentBased(root) if name.startswith("parentbased_") else root
    return DecidedByParent(sampler) if root_name in ("always_on", "always_off") else sampler


class SdkTracerProvider(TracerProvider):
    """The SDK's ``TracerProvider`` (``CHATOBS_TRACER=sdk``), saying whether it has a span
    processor, as :class:`~chatobs.tracing.LeanTracerProvider` does: without one, client
    calls skip their spans (see :mod:`chatobs.instrumentation.gate`)."""

    has_span_processors = False

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.has_span_processors = True


class AccountedSpanExporter(SpanExporter):
    """Exports through ``inner``; a failed export counts one ``traces`` failure and its spans
    as dropped, and while the collector is known down (:class:`ExportBackoff`) batches are
    dropped and counted the same way without being serialized. ``on_taken(count)`` is told of
    every batch handed over, whatever its fate."""

    def __init__(self, inner: SpanExporter, accounting: ExportAccounting, on_taken: Callable[[int], None]):
        self._inner = inner
        self._accounting = accounting
        self._on_taken = on_taken
        self._backoff = ExportBackoff()
        self._shutdown = _Once()

    def ready(self) -> bool:
        """False while the collector is known down (the backoff after a failed export)."""
        return self._backoff.allow()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._on_taken(len(spans))
        if self._backoff.attempt(lambda: self._inner.export(spans) is SpanExportResult.SUCCESS, "span"):
            return SpanExportResult.SUCCESS
        self._accounting.export_failed("traces")
        self._accounting.spans_dropped("export_failed", len(spans))
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._shutdown(self._inner.shutdown)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class BoundedBatchSpanProcessor(SpanProcessor):
    """The SDK's :class:`BatchSpanProcessor` behind a queue bound that chatobs keeps itself,
    so every span dropped for want of room is counted (the SDK drops them with a log line only).

    A span is admitted while fewer than ``max_queue_size`` admitted spans have not yet been
    handed to the exporter; the SDK's own queue is given room for a batch more, so it never
    reaches its limit and never drops silently. Memory stays bounded by ``max_queue_size``
    spans whatever the collector does (refuses, never answers).

    Example::

        provider.add_span_processor(BoundedBatchSpanProcessor(exporter, accounting=accounting))
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = 2048,
        schedule_delay_millis: float = 5000,
        max_export_batch_size: int = 512,
        accounting: ExportAccounting = NO_ACCOUNTING,
    ):
        self._limit = max_queue_size
        self._accounting = accounting
        self._queued = 0
        self._lock = threading.Lock()
        self._warned = False
        self._exporter = AccountedSpanExporter(exporter, accounting, self._taken)
        self._batch = BatchSpanProcessor(
            self._exporter,
            max_queue_size=max_queue_size + max_export_batch_size,
            schedule_delay_millis=schedule_delay_millis,
            max_export_batch_size=max_export_batch_size,
        )
        renew_in_forked_child(self, BoundedBatchSpanProcessor._after_fork)  # the SDK empties its queue there: so do we

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._queued = 0

    def _taken(self, count: int) -> None:
        with self._lock:
            self._queued = max(0, self._queued - count)

    # No on_start: the SDK's BatchSpanProcessor does nothing there, and a processor without
    # one is skipped when spans start (LeanTracerProvider).

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return  # recorded but not sampled (a sampler's RECORD_ONLY): never exported, never queued
        if not self._exporter.ready():
            # The collector is known down: the batch would be dropped unsent, so drop the span now,
            # with no queueing and no wake-up of the export thread on the way.
            self._accounting.spans_dropped("export_failed", 1)
            return
        with self._lock:
            full = self._queued >= self._limit
            if not full:
                self._queued += 1
        if full:
            self._accounting.spans_dropped("queue_full", 1)
            if not self._warned:
                self._warned = True
                _logger.warning("chatobs: span export queue full (%d); dropping spans, counted in "
                                "chatobs_spans_dropped_total", self._limit)  # fmt: skip
            return
        self._batch.on_end(span)

    @property
    def exporter(self) -> AccountedSpanExporter:
        """The exporter the batches go to (wrapping the one given)."""
        return self._exporter

    def shutdown(self) -> None:
        self._batch.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._batch.force_flush(timeout_millis)


def build_tracer_provider(
    settings: Settings,
    resource: Resource,
    accounting: ExportAccounting = NO_ACCOUNTING,
    pushes: PushExporters | None = None,
) -> SdkTracerProvider | LeanTracerProvider:
    """A tracer provider with one bounded batch processor per ``OTEL_TRACES_EXPORTER`` entry
    (``OTEL_BSP_*`` sizes; lost spans and failed exports counted in ``accounting``; exporters
    added to ``pushes``): chatobs's :class:`~chatobs.tracing.LeanTracerProvider`, or the SDK's
    with ``CHATOBS_TRACER=sdk``.

    With no exporter the provider still samples spans (``OTEL_TRACES_SAMPLER``): they carry
    the trace ids that exemplars, logs and downstream services refer to, and record nothing
    else (no processor would receive it).
    """
    otel = settings.otel
    sampler = build_sampler(otel)
    provider: SdkTracerProvider | LeanTracerProvider
    if settings.chatobs.tracer == "lean":
        provider = LeanTracerProvider(sampler=sampler, resource=resource)
    else:
        provider = SdkTracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
    for name in otel.traces_exporter:
        exporter = _otlp_span_exporter(otel) if name == "otlp" else ConsoleSpanExporter()
        processor = BoundedBatchSpanProcessor(
            exporter,
            max_queue_size=otel.bsp_max_queue_size,
            schedule_delay_millis=otel.bsp_schedule_delay,
            max_export_batch_size=otel.bsp_batch_size,
            accounting=accounting,
        )
        provider.add_span_processor(processor)
        if pushes is not None:
            pushes.add(processor.exporter)
    return provider
