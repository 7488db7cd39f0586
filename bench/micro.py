"""Micro-benchmarks, measured side by side in one process: chatobs vs prometheus_client.

Each comparison alternates the two contenders over several rounds and keeps the best
round of each (the least disturbed by this noisy machine); the ratio is chatobs / baseline.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from chatobs import Telemetry, load_settings
from chatobs.catalogue import LATENCY_BUCKETS

MODELS = ("sim-large", "sim-small", "gpt-4o-mini")


@dataclass
class Comparison:
    name: str
    ours: float
    baseline: float
    unit: str = "ns/op"

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline


def best_of(rounds: int, *contenders: Callable[[], float]) -> list[float]:
    """Run the contenders alternately ``rounds`` times; the best (lowest) figure of each."""
    best = [float("inf")] * len(contenders)
    for _ in range(rounds):
        for index, contender in enumerate(contenders):
            gc.collect()
            best[index] = min(best[index], contender())
    return best


def per_op(operation: Callable[[int], None], iterations: int) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter_ns()
        operation(iterations)
        return (time.perf_counter_ns() - started) / iterations

    return run


def telemetry(**env: str) -> Telemetry:
    return Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false", **env}), service="worker")


def recording(iterations: int, rounds: int) -> Comparison:
    ours = telemetry()
    request = ours.llm.request
    registry = CollectorRegistry()
    theirs = Counter("llm_requests", "LLM requests sent.", ["model", "provider", "mode"], registry=registry)

    def chatobs_loop(n: int) -> None:
        for i in range(n):
            request(MODELS[i % 3], "simulator", "normal")

    def prometheus_loop(n: int) -> None:
        for i in range(n):
            theirs.labels(MODELS[i % 3], "simulator", "normal").inc()

    a, b = best_of(rounds, per_op(chatobs_loop, iterations), per_op(prometheus_loop, iterations))
    ours.shutdown()
    return Comparison("counter: helper vs labels().inc()", a, b)


def histogram(iterations: int, rounds: int) -> Comparison:
    ours = telemetry()
    latency = ours.llm.latency
    registry = CollectorRegistry()
    theirs = Histogram("llm_latency_seconds", "LLM latency.", ["model", "provider", "mode"],
                       buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip

    def chatobs_loop(n: int) -> None:
        for i in range(n):
            latency(0.3, MODELS[i % 3], "simulator", "normal")

    def prometheus_loop(n: int) -> None:
        for i in range(n):
            theirs.labels(MODELS[i % 3], "simulator", "normal").observe(0.3)

    a, b = best_of(rounds, per_op(chatobs_loop, iterations), per_op(prometheus_loop, iterations))
    ours.shutdown()
    return Comparison("histogram: helper vs labels().observe()", a, b)


def populated(series: int) -> tuple[Telemetry, CollectorRegistry, Callable[[], None], Callable[[], None]]:
    """The same data in both: ``series`` counter series and ``series // 10`` histogram series;
    and for each, a function observing once more into every histogram series."""
    ours = telemetry(CHATOBS_MAX_LABEL_VALUES=str(max(series, 10)))
    registry = CollectorRegistry()
    counter = Counter("llm_requests", "LLM requests sent.", ["model", "provider", "mode"], registry=registry)
    hist = Histogram("llm_latency_seconds", "LLM latency.", ["model", "provider", "mode"], buckets=LATENCY_BUCKETS,
                     registry=registry)  # fmt: skip
    for i in range(series):
        ours.llm.request(f"model-{i}", "simulator", "normal")
        counter.labels(f"model-{i}", "simulator", "normal").inc()
    models = [f"model-{i}" for i in range(max(1, series // 10))]
    children = [hist.labels(model, "simulator", "normal") for model in models]

    def observe_ours() -> None:
        for model in models:
            ours.llm.latency(0.3, model, "simulator", "normal")

    def observe_theirs() -> None:
        for child in children:
            child.observe(0.3)

    observe_ours()
    observe_theirs()
    return ours, registry, observe_ours, observe_theirs


def scrape(series: int, rounds: int, changed: bool = False) -> tuple[Comparison, Comparison]:
    """``/metrics`` time and bytes at ``series`` series. ``changed``: every histogram series
    observed once more before each scrape (outside the timing), so no series' lines are the
    ones the last scrape rendered (chatobs keeps a histogram series' lines until it moves)."""
    ours, registry, observe_ours, observe_theirs = populated(series)
    ours_body = ours.scrape()[2]
    theirs_body = generate_latest(registry)

    # Small scrapes take a few ms: several per round, so one scheduler hiccup does not decide the round.
    repeat = max(1, 2_000 // series)

    def timed(scrape_once: Callable[[], object], observe: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            spent = 0
            for _ in range(repeat):
                if changed:
                    observe()
                started = time.perf_counter_ns()
                scrape_once()
                spent += time.perf_counter_ns() - started
            return float(spent) / repeat

        return run

    a, b = best_of(rounds, timed(ours.scrape, observe_ours), timed(lambda: generate_latest(registry), observe_theirs))
    ours.shutdown()
    moved = ", every histogram series moved" if changed else ", nothing moved"
    return (Comparison(f"/metrics time at {series} series{moved}", a / 1e6, b / 1e6, "ms"),
            Comparison(f"/metrics bytes at {series} series", len(ours_body), len(theirs_body), "bytes"))  # fmt: skip


def memory_per_series(series: int = 5000) -> Comparison:
    def measure(build: Callable[[], object]) -> float:
        gc.collect()
        tracemalloc.start()
        keep = build()
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del keep
        return current / series

    def ours() -> object:
        t, _ = populated_ours_only(series)
        t.scrape()  # the SDK allocates its storage per series on first collection too
        return t

    def theirs() -> object:
        registry = CollectorRegistry()
        counter = Counter("llm_requests", "h", ["model", "provider", "mode"], registry=registry)
        for i in range(series):
            counter.labels(f"model-{i}", "simulator", "normal").inc()
        return registry

    return Comparison(f"memory per counter series ({series})", measure(ours), measure(theirs), "bytes")


def populated_ours_only(series: int) -> tuple[Telemetry, None]:
    ours = telemetry(CHATOBS_MAX_LABEL_VALUES=str(series))
    for i in range(series):
        ours.llm.request(f"model-{i}", "simulator", "normal")
    return ours, None


__all__ = ["Comparison", "histogram", "memory_per_series", "prometheus_client", "recording", "scrape"]
