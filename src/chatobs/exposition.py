"""Prometheus exposition of OpenTelemetry metrics, named exactly as the catalogue says.

Why not the stock ``opentelemetry-exporter-prometheus``: it appends ``_total``
and unit suffixes to instrument names (two instruments can collide on one
exposed name), it labels every series with ``otel_scope_*``, it emits no
exemplars, and it copies every point into a ``prometheus_client`` registry
before rendering. Here a :class:`ScrapeReader` (a pull ``MetricReader``)
collects on each scrape and :class:`Renderer` writes the text directly:

* Prometheus text format 0.0.4, or OpenMetrics 1.0 when the scraper asks for it
  (``Accept``), with ``trace_id``/``span_id`` exemplars on histogram buckets;
* every catalogue metric the service owns is declared even before its first
  observation (unlabelled counters and histograms show zeros), so dashboards
  and ``rate()`` see a series from the first scrape;
* ``target_info`` and the ``otel_scope_*`` labels are switched by settings.

Example::

    >>> reader = ScrapeReader()
    >>> renderer = Renderer("gateway")
    >>> # MeterProvider(metric_readers=[reader], ...) then:
    >>> # status, headers, body = scrape_response(reader, renderer, accept, accept_encoding)
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    MetricReader,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.metrics.export import Metric as OtelMetric
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from chatobs.catalogue import CATALOGUE, Kind, Metric
from chatobs.cells import Cell, HistogramCell, LocalCells, exportable_exemplars, has_exact_ids
from chatobs.multiprocess import renew_in_forked_child

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "Collected",
    "Renderer",
    "ScrapeReader",
    "negotiate_openmetrics",
    "scrape_response",
]

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_HISTOGRAM_RESERVED = frozenset({"le"})
_BUCKET_LABELS = frozenset({"le", "quantile"})
_logger = logging.getLogger("chatobs")
_UNIT_SUFFIXES = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio"}
#: Most entries each of the renderer's caches keeps (label blocks, bucket lines, static text);
#: past it a cache starts again empty. Series are bounded by the label policy, so this is rarely reached.
_CACHE_LIMIT = 20_000
#: Most histogram series whose rendered lines the renderer keeps, per format (about 1 KB each,
#: a series' share of the scrape); series past it are rendered at every scrape. Not emptied
#: when full, unlike the caches above: a full cache that started again would render every
#: series at every scrape, and keep nothing.
_KEPT_SERIES_LIMIT = 20_000


def _cached(cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` the first time (``make()`` each time for an unhashable key)."""
    try:
        found = cache.get(key)
    except TypeError:  # an unhashable attribute value (a list): not cached
        return make()
    if found is None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        found = cache[key] = make()
    return found


class Collected(NamedTuple):
    """What one collection gave: the data-model metrics, and the observable metrics' readings
    to render as they are."""

    data: MetricsData | None
    readings: Mapping[str, Sequence[Observation]] = MappingProxyType({})


class ScrapeReader(MetricReader):
    """A pull reader: collects cumulative metrics when a scrape asks.

    ``produce(data)`` adds what the SDK does not collect (as :class:`chatobs.telemetry.Telemetry`
    passes it when several processes' files are combined: the cells and the observable
    metrics' callbacks, as points); ``read()`` gives the callbacks' readings a single process
    renders as they are. Both are part of the collection, timed with it. (A single process's
    cells are read by the scrape, not here: they never block, so they are never the previous
    collection's.)

    Scrapes are serialised, so two concurrent scrapes never interleave one
    collection's callbacks with another's. A scrape never fails for a slow or
    broken collection: it then gets the last good collection (stale beats empty,
    and a counter that disappears for one scrape would read as a reset).
    """

    def __init__(
        self,
        produce: Callable[[MetricsData | None], MetricsData | None] | None = None,
        read: Callable[[], Mapping[str, Sequence[Observation]]] | None = None,
    ) -> None:
        super().__init__()
        self._produce = produce
        self._read = read
        self._lock = threading.Lock()
        self._latest: MetricsData | None = None
        self._last_good = Collected(None)
        # A forked child (gunicorn --preload) needs a lock of its own: one held by a scrape in
        # the parent at the fork is never released in the child, whose every scrape would then
        # wait out its timeout and serve the parent's last collection.
        renew_in_forked_child(self, ScrapeReader._renew_lock)

    def _renew_lock(self) -> None:
        self._lock = threading.Lock()

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        self._latest = metrics_data

    def scrape(self, timeout_seconds: float = 5.0) -> Collected:
        """Collect now and return what was collected, or the last good collection when another
        scrape holds the collection past ``timeout_seconds`` or the collection fails (an empty
        one if there is none)."""
        if not self._lock.acquire(timeout=timeout_seconds):
            _logger.warning("chatobs: collection still busy after %.1fs; serving the previous one", timeout_seconds)
            return self._last_good
        try:
            self._latest = None
            started = time.monotonic()
            try:
                self.collect(timeout_millis=timeout_seconds * 1000)
                data = self._produce(self._latest) if self._produce is not None else self._latest
                collected = Collected(data, self._read()) if self._read is not None else Collected(data)
            except Exception:
                _logger.warning("chatobs: collection failed; serving the previous one", exc_info=True)
                return self._last_good
            if time.monotonic() - started > timeout_seconds:
                # The SDK abandons a collection past its deadline only between two instruments'
                # callbacks, and chatobs's own part has no deadline of its own: past it, the whole
                # collection is abandoned here.
                _logger.warning("chatobs: collection took over %.1fs; serving the previous one", timeout_seconds)
                return self._last_good
            if collected.data is not None or collected.readings:
                self._last_good = collected
            return collected
        finally:
            self._lock.release()

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._latest = None


def _num(value: float | int) -> str:
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is float and -math.inf < value < math.inf:  # finite (NaN compares false): no calls but repr
        return repr(value)
    try:
        value = float(value)  # bool, Decimal, numpy scalars: their repr is not a Prometheus number
    except (TypeError, ValueError):
        return "NaN"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if openmetrics else text


def _sanitize(name: str) -> str:
    name = _INVALID_NAME_CHARS.sub("_", name)
    return f"_{name}" if name[:1].isdigit() else name


def _occupied_names(name: str, prom_type: str) -> set[str]:
    """Every name a family takes in either format: its family names (OpenMetrics writes a counter
    without ``_total``) and its sample names. A family that shares one with another makes the
    scrape unparseable (``clashing name``): a gauge ``req_seconds_count`` beside a histogram
    ``req_seconds``, or an up-down counter ``target`` beside OpenMetrics' ``target`` info."""
    if prom_type == "counter":
        return {name, name.removesuffix("_total")}
    if prom_type == "histogram":
        return {name, f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return {name}


#: What a scrape's ``name[]`` selects ``target_info`` by, as prometheus_client does.
_TARGET_INFO_NAMES = frozenset({"target_info"})


def _wanted(names: frozenset[str] | None, occupied: Iterable[str]) -> bool:
    """Whether a family taking ``occupied`` (:func:`_occupied_names`) is asked for: every one
    when ``names`` is None (no ``name[]`` in the request)."""
    return names is None or not names.isdisjoint(occupied)


def _label_name(key: str) -> str:
    """A valid, unreserved Prometheus label name for an attribute key, which can be anything."""
    name = _INVALID_LABEL_CHARS.sub("_", key)  # unlike a metric name, no `:`
    if name[:1].isdigit():
        name = f"_{name}"
    # Prometheus reserves `__*` label names (a `__name__` label makes the line unparseable).
    return f"key{name}" if name.startswith("__") else name


def _label_block(pairs: Iterable[tuple[str, Any]], reserved: frozenset[str] = frozenset()) -> str:
    """``{k="v",...}``; a key that collides with an earlier one once sanitised (``a.b`` and
    ``a_b``), or with a ``reserved`` name (``le`` on histograms), is dropped: a duplicate
    label name would make the whole scrape unparseable."""
    seen = set(reserved)
    parts = []
    for key, value in pairs:
        name = _label_name(key)
        if name in seen:
            continue
        seen.add(name)
        parts.append(f'{name}="{_escape_label(str(value))}"')
    return f"{{{','.join(parts)}}}" if parts else ""


def _with(labels: str, extra: str) -> str:
    """Add one ``key="value"`` pair to an existing label block."""
    return f"{{{labels[1:-1]},{extra}}}" if labels else f"{{{extra}}}"


def _exemplar_suffix(value: float, at: int, trace_id: int, span_id: int) -> str:
    labels = f'trace_id="{trace_id:032x}",span_id="{span_id:016x}"'
    return f" # {{{labels}}} {_num(value)} {at / 1e9:.3f}"


def _bucket_index(bounds: Sequence[float], value: float) -> int:
    for index, upper in enumerate(bounds):
        if value <= upper:
            return index
    return len(bounds)


class _Family:
    """What the renderer needs to know about one exposed family."""

    __slots__ = ("description", "name", "prom_type")

    def __init__(self, name: str, prom_type: str, description: str):
        self.name = name
        self.prom_type = prom_type
        self.description = description


class Renderer:
    """Renders collected OpenTelemetry metrics as Prometheus text or OpenMetrics.

    ``service`` decides which catalogue metrics are declared before they have
    data (its own); metrics of other owners still appear once recorded.
    """

    def __init__(
        self,
        service: str,
        *,
        catalogue: Sequence[Metric] = CATALOGUE,
        target_info: bool = True,
        scope_labels: bool = False,
        uncatalogued: bool = False,
        resource: Resource | None = None,
    ):
        self._catalogue = {metric.name: metric for metric in catalogue}
        # `target_info` from the first scrape, even before any instrument has data to carry the resource.
        self._resource = resource
        self._declared = frozenset(metric.name for metric in catalogue if metric.owned_by(service))
        self._target_info = target_info
        self._scope_labels = scope_labels
        self._uncatalogued = uncatalogued
        # An uncatalogued metric renamed into a family name already used (`http.server.request.duration`
        # in seconds is the catalogue's `http_server_request_duration_seconds`; `a.b` and `a_b`) is left
        # out: one family twice makes the whole scrape unparseable ("clashing name").
        self._occupied = {
            metric.name: _occupied_names(metric.name, metric.prometheus_type) for metric in self._catalogue.values()
        }
        self._catalogue_names = frozenset({"target", "target_info"}.union(*self._occupied.values()))
        # What the service declares but has no data of yet, as text by format (the catalogue's
        # metrics: bounded).
        self._declared_texts: dict[bool, dict[str, str]] = {False: {}, True: {}}
        # A catalogue family's name, type and help never change: made once, not at each scrape.
        self._families = {
            metric.name: _Family(metric.name, metric.prometheus_type, metric.description)
            for metric in self._catalogue.values()
        }
        self._clashes_logged: set[str] = set()
        # The SDK hands each exemplar to one collection only; whichever scrape comes first
        # (text format, a second Prometheus, `chatobs check`) would take it. Keep the last
        # exemplar of each bucket so every OpenMetrics scrape shows it. Bounded by series x buckets.
        self._exemplars: dict[tuple[str, str, int], str] = {}
        # What one scrape writes again the next time: headers, declarations and target_info
        # (constant), label blocks (one per series) and a histogram's bucket line prefixes.
        # Most of a scrape's lines are these; only the numbers change between scrapes.
        self._static: dict[tuple[Any, ...], str] = {}
        self._label_blocks: dict[tuple[Any, ...], str] = {}
        self._bucket_lines: dict[tuple[Any, ...], tuple[tuple[str, ...], str, str]] = {}
        # A histogram cell's lines as last rendered, with the cell and its count then: most of
        # a quiet service's histogram series see no observation between two scrapes, and a
        # series' lines (a dozen buckets) were most of its scrape. A new count renders again
        # (a cell counts an observation and keeps its exemplar under one lock).
        self._histogram_texts: dict[tuple[str, str, bool], tuple[HistogramCell, int, str]] = {}
        # A cell's label text: a cell's attributes never change, and working the text out again
        # from them was a fifth of a service's scrape. All made with one scope's labels (a
        # service's cells are one scope's), emptied if those change.
        self._cell_label_texts: dict[Cell, str] = {}
        self._cell_label_scope = ""
        self._target_infos: dict[bool, tuple[Resource, str]] = {}

    # -- public --------------------------------------------------------------
    def render(
        self, data: MetricsData | None, openmetrics: bool = False, local: LocalCells | None = None,
        names: frozenset[str] | None = None,
    ) -> str:  # fmt: skip
        """The exposition text for ``data`` (``None`` renders the declarations only), and for
        ``local``: this process's cells and the observable metrics' readings by metric name,
        rendered as they are rather than as data-model points first
        (:meth:`chatobs.cells.CellStore.local_cells`,
        :meth:`chatobs.instruments.Instruments.readings`); a histogram cell whose count has not
        moved since the last rendering is written from that rendering's text. A label set that
        both carry is shown once, ``data``'s.

        With ``names``, only the families that have one of them as a family or sample name
        (``x_total``, ``h_bucket``, ``target_info``). prometheus_client's ``name[]`` keeps only
        the samples named; a family here comes whole, so ``h_count`` brings its buckets too."""
        out: list[str] = []
        collected: dict[str, list[tuple[OtelMetric, str]]] = {}
        resource: Resource | None = self._resource
        for resource_metrics in data.resource_metrics if data else ():
            resource = resource_metrics.resource
            for scope_metrics in resource_metrics.scope_metrics:
                scope_pairs = self._scope_block(scope_metrics.scope)
                for metric in scope_metrics.metrics:
                    collected.setdefault(metric.name, []).append((metric, scope_pairs))

        cells, readings = (local.cells, local.readings) if local is not None else ({}, {})
        local_scope = self._scope_block(local.scope) if local is not None else ""
        if local_scope != self._cell_label_scope:  # the kept texts were made under other scope labels
            self._cell_label_texts.clear()
            self._cell_label_scope = local_scope
        # Once a catalogue metric each scrape: the filter and the declarations looked up here,
        # not through a call each (a quiet service's scrape is mostly this loop).
        occupied = self._occupied
        declared = self._declared
        declared_texts = self._declared_texts[openmetrics]
        for metric in self._catalogue.values():
            name = metric.name
            entries = collected.pop(name, None)
            if names is not None and names.isdisjoint(occupied[name]):
                continue
            own_cells = cells.get(name)
            own = own_cells or readings.get(name)
            if entries or own:
                self._render_collected(out, entries or [], metric, openmetrics, own, local_scope, bool(own_cells))
            elif name in declared:
                text = declared_texts.get(name)
                if text is None:  # bounded by the catalogue
                    text = declared_texts[name] = _declared_text(metric, openmetrics)
                out.append(text)
        if self._uncatalogued:
            taken = set(self._catalogue_names)
            for name, entries in collected.items():
                family = self._family(entries[0][0], None)
                occupied = _occupied_names(family.name, family.prom_type)
                if not taken.isdisjoint(occupied):
                    self._skip_clash(name, family.name)
                    continue
                taken |= occupied
                if _wanted(names, occupied):
                    self._render_collected(out, entries, None, openmetrics)
        if self._target_info and resource is not None and _wanted(names, _TARGET_INFO_NAMES):
            self._render_target_info(out, resource, openmetrics)
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out)

    def _skip_clash(self, otel_name: str, family_name: str) -> None:
        if otel_name not in self._clashes_logged:  # once per name: a scrape every few seconds
            self._clashes_logged.add(otel_name)
            _logger.warning("uncatalogued metric %r is not exposed: its name %s is taken", otel_name, family_name)

    def _scope_block(self, scope: InstrumentationScope) -> str:
        if not self._scope_labels:
            return ""
        return _label_block([("otel_scope_name", scope.name), ("otel_scope_version", scope.version or "")])

    def _render_collected(
        self,
        out: list[str],
        entries: list[tuple[OtelMetric, str]],
        catalogued: Metric | None,
        openmetrics: bool,
        own: Sequence[Cell | Observation] | None = None,
        own_scope: str = "",
        own_are_cells: bool = False,
    ) -> None:
        # One name from several scopes (another meter with a catalogue name, two HTTP client
        # instrumentations) is one family: one header, and a label set seen twice kept once.
        family = self._families[catalogued.name] if catalogued is not None else self._family(entries[0][0], None)
        self._header(out, family, openmetrics)
        seen: set[str] = set()
        for otel_metric, scope_labels in entries:
            self._samples(out, family, otel_metric, scope_labels, openmetrics, seen)
        if own and catalogued is not None:
            self._cell_samples(out, family.name, catalogued, own, own_scope, openmetrics, seen, own_are_cells)

    def _cell_samples(
        self, out: list[str], name: str, metric: Metric, cells: Sequence[Cell | Observation], scope_labels: str,
        openmetrics: bool, seen: set[str], are_cells: bool,
    ) -> None:  # fmt: skip
        """The samples of cells (``are_cells``) or readings, as their points would render
        (``tests/unit/test_produced.py``)."""
        if metric.buckets is not None:  # only cells: the observable metrics are gauges
            texts = self._histogram_texts
            for cell in cells:
                labels = self._cell_labels(cell, scope_labels, _HISTOGRAM_RESERVED)  # type: ignore[arg-type]
                if labels in seen:
                    continue
                seen.add(labels)
                key = (name, labels, openmetrics)
                kept = texts.get(key)
                if kept is not None and kept[0] is cell and kept[1] == cell.count:  # type: ignore[union-attr]
                    out.append(kept[2])
                    continue
                counts, count, total, exemplars = cell.snapshot()  # type: ignore[union-attr]
                # A cell keeps its exemplars (the SDK hands each to one collection only), so the
                # text format, which shows none, need not format them.
                found = ((value, at, span.trace_id, span.span_id)
                         for value, at, span in exportable_exemplars(exemplars)) if openmetrics else ()  # fmt: skip
                lines: list[str] = []
                self._histogram_lines(lines, name, labels, metric.buckets, counts, count, total, found, openmetrics)
                text = "".join(lines)
                if kept is not None or len(texts) < _KEPT_SERIES_LIMIT * 2:  # both formats
                    texts[key] = (cell, count, text)  # type: ignore[assignment]
                out.append(text)
            return
        for cell in cells:
            if are_cells:
                labels = self._cell_labels(cell, scope_labels)  # type: ignore[arg-type]
            else:  # a reading is a new object at each collection: nothing to keep by it
                labels = self._attribute_labels(cell.attributes, scope_labels)
            if labels not in seen:
                seen.add(labels)
                out.append(f"{name}{labels} {_num(cell.value)}\n")  # type: ignore[union-attr]

    # -- families ------------------------------------------------------------
    @staticmethod
    def _family(otel_metric: OtelMetric | None, catalogued: Metric | None) -> _Family:
        if catalogued is not None:
            return _Family(catalogued.name, catalogued.prometheus_type, catalogued.description)
        assert otel_metric is not None  # an uncatalogued family comes from collected data only
        data = otel_metric.data
        if isinstance(data, Histogram):
            prom_type = "histogram"
        elif isinstance(data, Sum) and data.is_monotonic:
            prom_type = "counter"
        else:
            prom_type = "gauge"
        name = _sanitize(otel_metric.name)
        suffix = _UNIT_SUFFIXES.get(otel_metric.unit or "")
        if suffix and not name.endswith(suffix) and not (suffix == "ratio" and prom_type != "gauge"):
            name = f"{name}_{suffix}"
        if prom_type == "counter" and not name.endswith("_total"):
            name = f"{name}_total"
        return _Family(name, prom_type, otel_metric.description or "")

    def _header(self, out: list[str], family: _Family, openmetrics: bool) -> None:
        key = ("header", family.name, family.prom_type, family.description, openmetrics)
        text = self._static.get(key)  # strings only in the key: always hashable
        if text is None:
            text = _cached(self._static, key, lambda: _header_text(family, openmetrics))
        out.append(text)

    # -- samples -------------------------------------------------------------
    def _samples(
        self,
        out: list[str],
        family: _Family,
        otel_metric: OtelMetric,
        scope_labels: str,
        openmetrics: bool,
        seen: set[str],
    ) -> None:
        data = otel_metric.data
        name = family.name
        if isinstance(data, Histogram):
            for point in data.data_points:
                labels = self._attribute_labels(point.attributes, scope_labels, _HISTOGRAM_RESERVED)
                if labels not in seen:
                    seen.add(labels)
                    self._histogram_point(out, name, point, labels, openmetrics)
            return
        if isinstance(data, (Sum, Gauge)):
            for point in data.data_points:
                labels = self._attribute_labels(point.attributes, scope_labels)
                if labels not in seen:
                    seen.add(labels)
                    out.append(f"{name}{labels} {_num(point.value)}\n")

    def _attribute_labels(
        self, attributes: Mapping[str, Any] | None, scope_labels: str, reserved: frozenset[str] = frozenset()
    ) -> str:
        pairs = tuple(attributes.items()) if attributes else ()
        for _, value in pairs:
            if value.__class__ is not str:
                # Not cached: `True`, `1` and `1.0` are equal keys, yet separate series in the SDK
                # and separate label texts here; sharing one entry would drop all but one of them.
                return _labels_text(pairs, scope_labels, reserved)
        return _cached(self._label_blocks, (pairs, scope_labels, reserved),
                       lambda: _labels_text(pairs, scope_labels, reserved))  # fmt: skip

    def _cell_labels(self, cell: Cell, scope_labels: str, reserved: frozenset[str] = frozenset()) -> str:
        """``cell``'s label text, worked out from its attributes the first time only (under the
        scope labels :meth:`render` kept the texts for)."""
        texts = self._cell_label_texts
        labels = texts.get(cell)
        if labels is None:
            labels = self._attribute_labels(cell.attributes, scope_labels, reserved)
            if len(texts) < _KEPT_SERIES_LIMIT:
                texts[cell] = labels
        return labels

    def _histogram_point(
        self, out: list[str], name: str, point: HistogramDataPoint, labels: str, openmetrics: bool
    ) -> None:
        found = ((e.value, e.time_unix_nano, e.trace_id, e.span_id)
                 for e in point.exemplars if e.trace_id and has_exact_ids(e.trace_id, e.span_id))  # fmt: skip
        self._histogram_lines(out, name, labels, point.explicit_bounds, point.bucket_counts, point.count, point.sum,
                              found, openmetrics)  # fmt: skip

    def _histogram_lines(
        self, out: list[str], name: str, labels: str, bounds: Sequence[float], bucket_counts: Sequence[int],
        count: int, total: float, found: Iterable[tuple[float, int, int, int]], openmetrics: bool,
    ) -> None:  # fmt: skip
        """A histogram series' lines; ``found``: its exemplars, ``(value, time in ns, trace id, span id)``."""
        for value, at, trace_id, span_id in found:
            self._exemplars[(name, labels, _bucket_index(bounds, value))] = _exemplar_suffix(value, at, trace_id,
                                                                                             span_id)  # fmt: skip
        key = (name, labels, tuple(bounds))
        prefixes = self._bucket_lines.get(key)  # strings and floats: always hashable
        if prefixes is None:
            prefixes = _cached(self._bucket_lines, key, lambda: _bucket_prefixes(name, labels, bounds))
        buckets, count_prefix, sum_prefix = prefixes
        cumulative = 0
        exemplars = self._exemplars if openmetrics else {}
        for index, bucket_count in enumerate(bucket_counts):
            cumulative += bucket_count
            suffix = exemplars.get((name, labels, index), "") if exemplars else ""
            out.append(f"{buckets[index]}{cumulative}{suffix}\n")
        out.append(f"{count_prefix}{count}\n{sum_prefix}{_num(total)}\n")

    def _render_target_info(self, out: list[str], resource: Resource, openmetrics: bool) -> None:
        kept = self._target_infos.get(openmetrics)
        if kept is None or kept[0] is not resource:  # the same resource, scrape after scrape
            kept = self._target_infos[openmetrics] = (resource, _target_info_text(resource, openmetrics))
        out.append(kept[1])


def _header_text(family: _Family, openmetrics: bool) -> str:
    help_text = _escape_help(family.description, openmetrics)
    if openmetrics:
        base = family.name[: -len("_total")] if family.prom_type == "counter" else family.name
        return f"# TYPE {base} {family.prom_type}\n# HELP {base} {help_text}\n"
    return f"# HELP {family.name} {help_text}\n# TYPE {family.name} {family.prom_type}\n"


def _declared_text(metric: Metric, openmetrics: bool) -> str:
    """A metric with no data yet: its header and, without labels, its zero series."""
    out = [_header_text(_Family(metric.name, metric.prometheus_type, metric.description), openmetrics)]
    if metric.labels:
        pass  # no series until a label set is recorded, as prometheus_client does
    elif metric.kind in (Kind.COUNTER, Kind.UP_DOWN):
        out.append(f"{metric.name} 0\n")
    elif metric.kind is Kind.HISTOGRAM:
        for bound in metric.buckets or ():
            out.append(f'{metric.name}_bucket{{le="{_num(float(bound))}"}} 0\n')
        out.append(f'{metric.name}_bucket{{le="+Inf"}} 0\n{metric.name}_count 0\n{metric.name}_sum 0\n')
    return "".join(out)


def _labels_text(pairs: tuple[tuple[str, Any], ...], scope_labels: str, reserved: frozenset[str]) -> str:
    labels = _label_block(pairs, reserved)
    if scope_labels:
        labels = _with(labels, scope_labels[1:-1]) if labels else scope_labels
    return labels


def _bucket_prefixes(name: str, labels: str, bounds: Sequence[float]) -> tuple[tuple[str, ...], str, str]:
    """Each bucket line up to its count (``name_bucket{...,le="0.1"} ``), then the count's and the sum's."""
    pairs = [f'le="{_num(float(bound))}"' for bound in bounds] + ['le="+Inf"']
    buckets = tuple(f"{name}_bucket{_with(labels, pair)} " for pair in pairs)
    return buckets, f"{name}_count{labels} ", f"{name}_sum{labels} "


def _target_info_text(resource: Resource, openmetrics: bool) -> str:
    # A resource attribute may be called anything; `le` and `quantile` mean buckets and
    # quantiles to Prometheus (promtool flags them on a gauge), so they are renamed.
    pairs = [(f"key_{key}" if key in _BUCKET_LABELS else key, value) for key, value in resource.attributes.items()]
    labels = _label_block(sorted(pairs))
    if openmetrics:
        return f"# TYPE target info\n# HELP target Target metadata\ntarget_info{labels} 1\n"
    return f"# HELP target_info Target metadata\n# TYPE target_info gauge\ntarget_info{labels} 1\n"


def negotiate_openmetrics(accept: str | None) -> bool:
    """True when ``accept`` prefers OpenMetrics 1.x to the classic text format.

    Honours ``q`` weights the way Prometheus sends them
    (``application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5``), and the
    most specific range for text (RFC 9110: ``text/plain;q=0`` refuses it even beside ``*/*``).
    An OpenMetrics ``version`` other than 1.x is not what is served, so it does not count.

    >>> negotiate_openmetrics("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.4")
    True
    >>> negotiate_openmetrics("application/openmetrics-text;version=0.0.1")
    False
    """
    if not accept:
        return False
    best_om = 0.0
    text_by_range: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        quality = _quality(params)
        if media == "application/openmetrics-text":
            version = _param(params, "version")
            if version is None or version == "1" or version.startswith("1."):
                best_om = max(best_om, quality)
        elif media in _TEXT_RANGES:
            text_by_range[media] = max(text_by_range.get(media, 0.0), quality)
    best_text = next((text_by_range[media] for media in _TEXT_RANGES if media in text_by_range), 0.0)
    return best_om > 0 and best_om >= best_text


#: The ranges that match the classic text format, the most specific first.
_TEXT_RANGES = ("text/plain", "text/*", "*/*")


def _param(params: Iterable[str], name: str) -> str | None:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None


def _quality(params: Iterable[str]) -> float:
    value = _param(params, "q")
    if value is None:
        return 1.0
    try:
        return float(value)
    except ValueError:
        return 0.0


#: zlib's window bits for a gzip member (16 + the 32 KB window): zlib writes the header and
#: trailer itself, in C. ``gzip.compress`` writes them in Python, which a quiet service runs
#: cold at each scrape: 135 against 110 µs for a 20 KB body, the same bytes but the header's.
_GZIP_MEMBER = 16 + zlib.MAX_WBITS


def _gzipped(body: bytes) -> bytes:
    # Level 1: scrape bodies compress ~7-10x even so, at a fraction of level 6's cost.
    compressor = zlib.compressobj(1, zlib.DEFLATED, _GZIP_MEMBER)
    return compressor.compress(body) + compressor.flush()


def _accepts_gzip(accept_encoding: str | None) -> bool:
    for part in (accept_encoding or "").split(","):
        coding, *params = part.split(";")
        if coding.strip().lower() == "gzip" and _quality(params) > 0:
            return True
    return False


def scrape_response(
    reader: ScrapeReader,
    renderer: Renderer,
    accept: str | None,
    accept_encoding: str | None,
    timeout_seconds: float = 5.0,
    local: Callable[[], LocalCells | None] | None = None,
    names: Collection[str] | None = None,
) -> tuple[int, Mapping[str, str], bytes]:
    """Collect, render and encode one scrape: ``(status, headers, body)``; ``local`` gives
    this process's cells, rendered as they are with the collection's readings (see
    :meth:`Renderer.render`); ``names``, the families wanted (:meth:`Renderer.render`).

    Shared by the FastAPI route and the standalone server so both behave alike.
    """
    openmetrics = negotiate_openmetrics(accept)
    collected = reader.scrape(timeout_seconds)
    own = local() if local is not None else None
    if own is not None and collected.readings:
        own = own._replace(readings=collected.readings)
    text = renderer.render(collected.data, openmetrics, own, frozenset(names) if names else None)
    try:
        body = text.encode()
    except UnicodeEncodeError:  # a lone surrogate in some label value: one '?' beats a failed scrape
        body = text.encode("utf-8", "replace")
    headers = {
        "Content-Type": CONTENT_TYPE_OPENMETRICS if openmetrics else CONTENT_TYPE_TEXT,
        "Vary": "Accept, Accept-Encoding",
    }
    if _accepts_gzip(accept_encoding):
        body = _gzipped(body)
        headers["Content-Encoding"] = "gzip"
    return 200, headers, body
