"""Bounded cardinality: a million tenants, and more series than an SDK's default limit.

Read from the scrape, as Prometheus would: tenant-labelled series stay at or under
``CHATOBS_MAX_LABEL_VALUES`` plus one ``other``, ``other`` carries every overflowing count
(nothing is lost: the counts sum to the number of recordings), the overflow is counted in
``chatobs_label_rejections_total``, memory stops growing once the bounded caches are
full, and no series is ever folded into the SDK's ``otel.metric.overflow`` series.
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from collections import defaultdict

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

import chatobs.instruments as instruments_module
from chatobs import Telemetry, load_settings
from chatobs.catalogue import CATALOGUE, OVERFLOW_VALUE, get
from chatobs.check import check_exposition
from chatobs.check import series_bound as checked_series_bound
from chatobs.labels import series_bound

OPENMETRICS = "application/openmetrics-text"
CAP = 100
TENANTS = 1_000_000
#: Past the first WARM_UP ids every bounded structure is full (the label and cell caches
#: remember 4096 raw values per metric; during the warm-up the gauges see every 10th id).
WARM_UP = 50_000
#: Largest resident-memory growth allowed from the WARM_UP-th id to the millionth: a leak of
#: even 8 bytes per id (the smallest Python allocation) would be 7.6 MB.
RSS_BOUND = 4 * 1024 * 1024
#: Largest growth of traced allocations over 100,000 further ids (measured: 0 bytes).
TRACED_BOUND = 64 * 1024


def build(**env: str) -> Telemetry:
    return Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false", **env}), service="worker")


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def series(text: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """Sample name -> label set -> value, from the text format."""
    found: dict[str, dict[frozenset[tuple[str, str]], float]] = defaultdict(dict)
    for family in parse_text(text):
        for sample in family.samples:
            found[sample.name][frozenset(sample.labels.items())] = sample.value
    return found


def rejections(samples: dict[str, dict[frozenset[tuple[str, str]], float]], metric: str) -> float:
    return sum(
        value
        for labels, value in samples["chatobs_label_rejections_total"].items()
        if dict(labels) == {"metric": metric, "label": "tenant"}
    )


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc")
def test_a_million_tenants_stay_within_the_cap_with_nothing_lost_and_memory_flat():
    telemetry = build(CHATOBS_MAX_LABEL_VALUES=str(CAP))
    overrun, tokens = telemetry.budgets.token_overrun, telemetry.budgets.tokens
    # Counted, not listed: a growing list would be the very allocation growth measured below.
    gauges = {"rejected": 0, "last_used": 0}

    def record(first: int, stop: int, gauges_every: int) -> None:
        for i in range(first, stop):
            tenant = f"tenant-{i}"
            overrun(tenant)  # a counter: every count must survive the overflow
            if i % gauges_every == 0:
                # Two gauges (synchronous SDK instruments, ~9 us a set) and a counter + 0.
                tokens(tenant, allowed=1000, used=i % 1000)
                gauges["rejected"] += i >= CAP  # the first CAP tenants were admitted
                gauges["last_used"] = i % 1000

    record(0, WARM_UP, gauges_every=10)  # the gauges' caches fill too
    telemetry.scrape()  # the SDK builds its storage on the first collection
    gc.collect()
    rss_before = resident_bytes()
    started = time.perf_counter()
    record(WARM_UP, TENANTS, gauges_every=100)
    seconds = time.perf_counter() - started
    gc.collect()
    rss_growth = resident_bytes() - rss_before

    # A precise figure over a further slice (tracemalloc slows recording several times over).
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    record(TENANTS, TENANTS + 100_000, gauges_every=100)
    gc.collect()
    traced_growth = tracemalloc.get_traced_memory()[0] - traced_before
    tracemalloc.stop()
    recorded = TENANTS + 100_000

    print(
        f"\n{TENANTS - WARM_UP:,} distinct tenants after a {WARM_UP:,} warm-up: {seconds:.2f} s "
        f"({seconds / (TENANTS - WARM_UP) * 1e6:.2f} us each, one in a hundred also sets two gauges); "
        f"resident memory growth {rss_growth / 1e6:.2f} MB (bound {RSS_BOUND / 1e6:.1f} MB); "
        f"traced allocations over 100,000 more: {traced_growth:,} bytes (bound {TRACED_BOUND:,})"
    )
    assert rss_growth <= RSS_BOUND
    assert traced_growth <= TRACED_BOUND

    text = telemetry.scrape()[2].decode()
    openmetrics = telemetry.scrape(OPENMETRICS)[2].decode()
    list(parse_openmetrics(openmetrics))
    samples = series(text)
    for name in ("tenant_budget_tokens_overruns_total", "tenant_budget_tokens_allowed", "tenant_budget_tokens_used"):
        tenants = {dict(labels)["tenant"] for labels in samples[name]}
        assert OVERFLOW_VALUE in tenants, name
        assert len(tenants) <= CAP + 1, f"{name}: {len(tenants)} series"
    overruns = samples["tenant_budget_tokens_overruns_total"]
    assert len(overruns) == CAP + 1
    assert sum(overruns.values()) == recorded  # nothing lost: the overflow went to `other`
    assert overruns[frozenset({("tenant", OVERFLOW_VALUE)})] == recorded - CAP
    assert all(value == 1 for labels, value in overruns.items() if dict(labels)["tenant"] != OVERFLOW_VALUE)
    # A gauge's `other` holds the last value set through it.
    assert samples["tenant_budget_tokens_used"][frozenset({("tenant", OVERFLOW_VALUE)})] == gauges["last_used"]

    rejected_gauge_calls = gauges["rejected"]
    assert rejections(samples, "tenant_budget_tokens_overruns_total") == (recorded - CAP) + rejected_gauge_calls
    assert rejections(samples, "tenant_budget_tokens_allowed") == rejected_gauge_calls
    assert rejections(samples, "tenant_budget_tokens_used") == rejected_gauge_calls

    for exposition in (text, openmetrics):
        assert "otel_metric_overflow" not in exposition and "otel.metric.overflow" not in exposition
    problems = [p for family in check_exposition(text, False, telemetry.settings.chatobs) for p in family.problems]
    assert problems == []
    telemetry.shutdown()


def test_more_series_than_an_sdk_default_cardinality_limit_are_all_exposed():
    """4,800 series of one counter and 2,500 of one gauge, both aggregated by the SDK (the
    counter through its observable callback, the gauge as a synchronous instrument): an SDK
    with the specification's default limit of 2000 would fold the rest into one series."""
    telemetry = build(CHATOBS_MAX_LABEL_VALUES="3000")
    for model in range(60):
        for provider in range(40):
            for mode in ("normal", "degraded_bypass_somabrain"):
                telemetry.llm.request(f"model-{model}", f"provider-{provider}", mode)
    for tenant in range(2500):
        telemetry.budgets.tokens(f"tenant-{tenant}", allowed=100, used=tenant % 100)

    text = telemetry.scrape()[2].decode()
    samples = series(text)
    assert len(samples["llm_requests_total"]) == 4800
    assert set(samples["llm_requests_total"].values()) == {1}
    assert len(samples["tenant_budget_tokens_allowed"]) == 2500
    assert "chatobs_label_rejections_total{" not in text
    assert "otel_metric_overflow" not in text
    assert "otel_metric_overflow" not in telemetry.scrape(OPENMETRICS)[2].decode()
    telemetry.shutdown()


def test_views_give_an_sdk_with_a_cardinality_limit_the_catalogue_bound(monkeypatch):
    """On an SDK whose View takes ``aggregation_cardinality_limit``, every View gets the
    label policy's bound plus the SDK's own overflow slot: never less than it can need."""
    created: list[dict[str, object]] = []
    monkeypatch.setattr(instruments_module, "View", lambda **kwargs: created.append(kwargs))
    monkeypatch.setattr(instruments_module, "SDK_HAS_CARDINALITY_LIMIT", True)
    settings = load_settings({"CHATOBS_MAX_LABEL_VALUES": "50", "CHATOBS_TENANTS": "acme,globex"}).chatobs
    instruments_module.views(settings=settings)

    assert [kwargs["instrument_name"] for kwargs in created] == [metric.name for metric in CATALOGUE]
    for kwargs in created:
        metric = get(str(kwargs["instrument_name"]))
        assert kwargs["aggregation_cardinality_limit"] == series_bound(metric, settings) + 1
    limits = {kwargs["instrument_name"]: kwargs["aggregation_cardinality_limit"] for kwargs in created}
    assert limits["llm_requests_total"] == 51 * 51 * 3 + 1  # above the default 2000
    assert limits["tenant_budget_tokens_allowed"] == 3 + 1  # acme, globex, other


def test_the_policy_bound_agrees_with_chatobs_check():
    settings = load_settings({"CHATOBS_LLM_MODELS": "a,b,c", "CHATOBS_MAX_LABEL_VALUES": "7"}).chatobs
    for metric in CATALOGUE:
        checked = checked_series_bound(metric, settings)
        if checked is not None:  # `chatobs check` leaves source-bounded labels (routes) alone
            assert series_bound(metric, settings) == checked, metric.name
