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

from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from chatobs.instrumentation.spanmetrics import RecordClientSpans
from chatobs.settings import OtelSettings, Settings

__all__ = ["build_metric_readers", "build_resource", "build_sampler", "build_tracer_provider"]


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
    base = str(otel.exporter_otlp_endpoint).rstrip("/")
    # The specification: the generic endpoint is a base URL; HTTP appends the signal path.
    return protocol, base if protocol == "grpc" else f"{base}/v1/{signal}"


def _otlp_metric_exporter(otel: OtelSettings):
    protocol, endpoint = _otlp_target(otel, "metrics")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, headers=otel.otlp_headers or None)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter(endpoint=endpoint, headers=otel.otlp_headers or None)


def _otlp_span_exporter(otel: OtelSettings) -> SpanExporter:
    protocol, endpoint = _otlp_target(otel, "traces")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, headers=otel.otlp_headers or None)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint, headers=otel.otlp_headers or None)


class ProducingExporter(MetricExporter):
    """Hands each export to ``inner`` with the metrics ``augment`` adds (the histogram cells,
    which have no SDK instrument). Temporality is cumulative, as on ``/metrics``."""

    def __init__(self, inner: MetricExporter, augment: Callable[[MetricsData | None], MetricsData | None]):
        super().__init__()
        self._inner = inner
        self._augment = augment

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        data = self._augment(metrics_data) or metrics_data
        return self._inner.export(data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def build_metric_readers(
    settings: Settings, augment: Callable[[MetricsData | None], MetricsData | None] | None = None
) -> list[MetricReader]:
    """Push readers for ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``), each exporter given
    what ``augment`` adds to every export.

    The ``prometheus`` exporter is the pull :class:`~chatobs.exposition.ScrapeReader`,
    which the caller adds because it also serves it.
    """
    otel = settings.otel
    readers: list[MetricReader] = []
    push = {"otlp": _otlp_metric_exporter, "console": lambda _: ConsoleMetricExporter()}
    for name in otel.metrics_exporter:
        if name in push:
            exporter = push[name](otel)
            readers.append(
                PeriodicExportingMetricReader(
                    ProducingExporter(exporter, augment) if augment else exporter,
                    export_interval_millis=otel.metric_export_interval,
                    export_timeout_millis=otel.metric_export_timeout,
                )
            )
    return readers


def build_sampler(otel: OtelSettings) -> Sampler:
    """The ``OTEL_TRACES_SAMPLER`` sampler, wrapped so client spans it drops are still
    recorded for the backend metrics (see :class:`~chatobs.instrumentation.spanmetrics.RecordClientSpans`)."""
    name = otel.traces_sampler
    root_name = name.removeprefix("parentbased_")
    root: Sampler
    if root_name == "always_on":
        root = ALWAYS_ON
    elif root_name == "always_off":
        root = ALWAYS_OFF
    else:
        root = TraceIdRatioBased(otel.traces_sampler_arg)
    return RecordClientSpans(ParentBased(root) if name.startswith("parentbased_") else root)


def build_tracer_provider(settings: Settings, resource: Resource) -> TracerProvider:
    """A TracerProvider with one batch processor per ``OTEL_TRACES_EXPORTER`` entry.

    With no exporter the provider still samples spans (``OTEL_TRACES_SAMPLER``):
    they carry the trace ids that exemplars and logs refer to.
    """
    provider = TracerProvider(resource=resource, sampler=build_sampler(settings.otel), shutdown_on_exit=False)
    for name in settings.otel.traces_exporter:
        exporter = _otlp_span_exporter(settings.otel) if name == "otlp" else ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
