"""Validate live ``/metrics`` endpoints against the catalogue.

Parsing uses prometheus_client's own parsers (the OpenMetrics one when the
endpoint answers OpenMetrics), so what passes here is what a Prometheus client
library accepts. Checks per family: catalogued name, TYPE, histogram bucket
boundaries, label keys, label values (fixed sets, and configured sets when the
checker runs with the services' environment), and the series count against
the bound the catalogue implies.

Example::

    [report] = check_endpoints(["http://127.0.0.1:8000/metrics"], settings)  # a gateway on its default port
    print(report.ok, report.violations)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import httpx
from prometheus_client.metrics_core import Metric as ParsedFamily
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from chatobs import catalogue
from chatobs.catalogue import OVERFLOW_VALUE, Metric, allowed_fixed_values
from chatobs.server import MetricsAuth
from chatobs.settings import ChatobsSettings

__all__ = ["ACCEPT_LIKE_PROMETHEUS", "EndpointReport", "FamilyResult", "check_endpoints", "check_exposition"]

#: The Accept header Prometheus 2.x sends: OpenMetrics preferred, text accepted.
ACCEPT_LIKE_PROMETHEUS = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)

_SAMPLE_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum", "_created"), "counter": ("_total", "_created")}
_ALWAYS_ALLOWED_LABELS = {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}
_INFRASTRUCTURE_FAMILIES = {"target", "target_info"}


@dataclass
class FamilyResult:
    """What ``chatobs check`` found for one exposed family."""

    name: str
    prometheus_type: str
    series: int
    problems: list[str] = field(default_factory=list)


@dataclass
class EndpointReport:
    url: str
    error: str | None = None
    families: list[FamilyResult] = field(default_factory=list)

    @property
    def violations(self) -> list[str]:
        found = [f"{self.url}: {self.error}"] if self.error else []
        found += [f"{self.url}: {family.name}: {problem}" for family in self.families for problem in family.problems]
        return found

    @property
    def ok(self) -> bool:
        return not self.violations


def _exposed_name(family: ParsedFamily) -> str:
    # The parsers strip `_total` from counter family names; the catalogue keeps it.
    return f"{family.name}_total" if family.type == "counter" else family.name


def _allowed(metric: Metric, label: catalogue.Label, settings: ChatobsSettings) -> frozenset[str] | None:
    """The allowed values of ``label``, or ``None`` when any value may be admitted (first seen)."""
    if label.values:
        return allowed_fixed_values(metric, label) | {OVERFLOW_VALUE}
    if label.bounded_by:
        return None
    configured = getattr(settings, label.setting or "", ())
    return frozenset(configured) | {OVERFLOW_VALUE} if configured else None


def series_bound(metric: Metric, settings: ChatobsSettings) -> int | None:
    """Most series ``metric`` can have: the product of its labels' value counts (``other`` included);
    ``None`` when a label is bounded by its source rather than by chatobs (route templates)."""
    if any(label.bounded_by for label in metric.labels):
        return None
    bound = 1
    for label in metric.labels:
        allowed = _allowed(metric, label, settings)
        bound *= len(allowed) if allowed is not None else settings.max_label_values + 1
    return bound


def _check_family(family: ParsedFamily, settings: ChatobsSettings) -> FamilyResult:
    name = _exposed_name(family)
    series_keys = {tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le")) for sample in family.samples}
    result = FamilyResult(name, family.type, len(series_keys))
    try:
        metric = catalogue.get(name)
    except KeyError:
        result.problems.append("not in the catalogue")
        return result
    if family.type != metric.prometheus_type:
        result.problems.append(f"TYPE {family.type}, catalogue says {metric.prometheus_type}")
    expected_keys = set(metric.label_names)
    # Recorders always set every label; an instrumentation may leave one out (no route on a 404).
    optional = {label.name for label in metric.labels if label.bounded_by}
    for sample in family.samples:
        keys = set(sample.labels) - {"le"} - _ALWAYS_ALLOWED_LABELS
        if not (expected_keys - optional <= keys <= expected_keys):
            result.problems.append(f"labels {sorted(keys)}, catalogue says {sorted(expected_keys)}")
            break
    for label in metric.labels:
        allowed = _allowed(metric, label, settings)
        values = {sample.labels.get(label.name) for sample in family.samples} - {None}
        if allowed is not None and values - allowed:
            result.problems.append(f"label {label.name} has values outside the allowed set: {sorted(values - allowed)}")
        elif allowed is None and not label.bounded_by and len(values) > settings.max_label_values + 1:
            result.problems.append(
                f"label {label.name} has {len(values)} values, bound is {settings.max_label_values + 1}"
            )
    if metric.buckets is not None:
        expected = [*metric.buckets, math.inf]
        by_series: dict[tuple[tuple[str, str], ...], list[float]] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                by_series.setdefault(key, []).append(float(sample.labels["le"]))
        for bounds in by_series.values():
            if sorted(bounds) != expected:
                result.problems.append(f"buckets {sorted(bounds)}, catalogue says {expected}")
                break
    bound = series_bound(metric, settings)
    if bound is not None and result.series > bound:
        result.problems.append(f"{result.series} series, more than the catalogue's bound {bound}")
    return result


def check_exposition(text: str, openmetrics: bool, settings: ChatobsSettings) -> list[FamilyResult]:
    """Parse ``text`` and check every family in it. Raises ``ValueError`` if it does not parse."""
    parse = parse_openmetrics if openmetrics else parse_text
    families = list(parse(text))
    return [_check_family(family, settings) for family in families if family.name not in _INFRASTRUCTURE_FAMILIES]


def check_endpoints(urls: Iterable[str], settings: ChatobsSettings, timeout: float = 10.0) -> list[EndpointReport]:
    """Scrape each URL as Prometheus would and check it, with the scrape credentials ``settings``
    configure (``CHATOBS_METRICS_BEARER_TOKEN*``, ``CHATOBS_METRICS_BASIC_AUTH_*``), if any."""
    reports = []
    headers = {"Accept": ACCEPT_LIKE_PROMETHEUS}
    if (auth := MetricsAuth.from_settings(settings)) is not None:
        headers["Authorization"] = auth.credentials()
    with httpx.Client(timeout=timeout) as client:
        for url in urls:
            report = EndpointReport(url)
            try:
                response = client.get(url, headers=headers)
                response.raise_for_status()
                openmetrics = response.headers.get("content-type", "").startswith("application/openmetrics-text")
                report.families = check_exposition(response.text, openmetrics, settings)
            except httpx.HTTPError as exc:
                report.error = f"scrape failed: {exc}"
            except (ValueError, KeyError) as exc:
                report.error = f"exposition does not parse: {exc!r}"
            reports.append(report)
    return reports


def missing_metrics(reports: Sequence[EndpointReport]) -> list[str]:
    """Catalogue metrics that none of the endpoints exposes."""
    seen = {family.name for report in reports for family in report.families}
    return [metric.name for metric in catalogue.CATALOGUE if metric.name not in seen]
