"""Reading values back from a scrape, the way a user would."""

from __future__ import annotations

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text


def value(text: str, sample_name: str, **labels: str) -> float:
    """Sum of the samples called ``sample_name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        sample.value
        for family in parse_text(text)
        for sample in family.samples
        if sample.name == sample_name and labels.items() <= sample.labels.items()
    )


def exemplar_trace_ids(openmetrics_text: str, family_name: str) -> set[str]:
    return {
        sample.exemplar.labels["trace_id"]
        for family in parse_openmetrics(openmetrics_text)
        if family.name == family_name
        for sample in family.samples
        if sample.exemplar is not None
    }
