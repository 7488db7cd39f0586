"""Grafana dashboards generated from the metric catalogue.

Every catalogue metric gets a panel on the dashboard of its domain: counters as rates
by their labels, histograms as p50/p95/p99 with exemplars on (a latency spike links to
its trace), gauges as they are. Dashboards use a ``datasource`` variable, never a
hard-coded datasource uid, so they import into any Grafana 10+.

Example::

    for filename, dashboard in dashboards().items():
        Path("otel/grafana", filename).write_text(json.dumps(dashboard, indent=2))
"""

from __future__ import annotations

import json
from typing import Any

from chatobs.catalogue import CATALOGUE, Metric

__all__ = ["DASHBOARDS", "dashboards", "panel_queries", "render"]

_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Dashboard file -> (title, catalogue domains it shows).
DASHBOARDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chat-overview.json": ("Chat pipeline: overview", ("traffic", "http", "latency", "health", "process", "self")),
    "chat-llm-budgets.json": ("Chat pipeline: LLM and budgets", ("llm", "budgets", "tools")),
    "chat-degraded-backlog.json": ("Chat pipeline: degraded mode and backlog", ("somabrain", "backlog")),
    "chat-backends.json": ("Chat pipeline: backends", ("backends",)),
}


def _by(metric: Metric, *extra: str) -> str:
    labels = [*extra, "job", *metric.label_names]
    return ", ".join(dict.fromkeys(labels))


def panel_queries(metric: Metric) -> list[tuple[str, str]]:
    """``(legend, PromQL)`` pairs of the panel for ``metric``."""
    if metric.prometheus_type == "counter":
        return [("{{job}} " + " ".join(f"{{{{{n}}}}}" for n in metric.label_names),
                 f"sum by ({_by(metric)}) (rate({metric.name}[$__rate_interval]))")]  # fmt: skip
    if metric.prometheus_type == "histogram":
        return [
            (f"p{int(q * 100)} {{{{job}}}}",
             f"histogram_quantile({q}, sum by ({_by(metric, 'le')}) (rate({metric.name}_bucket[$__rate_interval])))")
            for q in (0.5, 0.95, 0.99)
        ]  # fmt: skip
    return [("{{job}} " + " ".join(f"{{{{{n}}}}}" for n in metric.label_names), f"{metric.name}")]


def _unit(metric: Metric) -> str:
    """Grafana unit of the panel's values. A counter's panel shows its rate, so its values are
    the counter's unit per second, not the counter's unit."""
    if metric.prometheus_type == "counter":
        if metric.unit == "s":
            return "percentunit"  # CPU seconds per second: the share of one core (1 = 100% = one core)
        # Grafana has a unit for requests per second only; the description names the others.
        return "reqps" if metric.unit == "{request}" else "short"
    if metric.unit == "s":
        return "s"
    if metric.unit == "By":
        return "bytes"
    return "short"


def _description(metric: Metric) -> str:
    """The catalogue's description, plus what a counter's rate panel shows where its unit does not say."""
    if metric.prometheus_type != "counter" or metric.unit == "{request}":
        return metric.description
    if metric.unit == "s":
        return f"{metric.description} Shown as a rate: CPU seconds per second, the share of one core (100% = one core)."
    thing = metric.unit.strip("{}")
    return f"{metric.description} Shown as a rate, in {thing[:-1] + 'ies' if thing.endswith('y') else thing + 's'}/s."


def _panel(metric: Metric, panel_id: int, x: int, y: int) -> dict[str, Any]:
    histogram = metric.prometheus_type == "histogram"
    targets = [
        {"datasource": _DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + index),
         "exemplar": histogram}
        for index, (legend, expr) in enumerate(panel_queries(metric))
    ]  # fmt: skip
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": metric.name,
        "description": _description(metric),
        "datasource": _DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": _unit(metric)}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": targets,
    }


def _dashboard(title: str, uid: str, metrics: list[Metric]) -> dict[str, Any]:
    panels = [_panel(metric, index + 1, 12 * (index % 2), 8 * (index // 2)) for index, metric in enumerate(metrics)]
    return {
        "uid": uid,
        "title": title,
        "tags": ["chat-pipeline", "chatobs"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def dashboards() -> dict[str, dict[str, Any]]:
    """``{file name: dashboard JSON model}``; every catalogue metric is on exactly one."""
    result = {}
    for filename, (title, domains) in DASHBOARDS.items():
        metrics = [metric for metric in CATALOGUE if metric.domain in domains]
        result[filename] = _dashboard(title, filename.removesuffix(".json"), metrics)
    return result


def render() -> dict[str, str]:
    """``{file name: JSON text}`` as written to ``otel/grafana/``."""
    return {name: json.dumps(model, indent=2) + "\n" for name, model in dashboards().items()}
