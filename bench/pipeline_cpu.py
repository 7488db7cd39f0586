"""Instrumentation's share of CPU under pipeline load.

Two loads:

* :func:`profiled_share`: chat turns one after another, 20 ms apart, on one session, and
  nothing else (no event-stream listener, no scrape): the gateway's work per message is
  then little more than the instrumented part, the hardest case for the share.
* :func:`demo_share`: the load of ``chatobs demo``, driven by the demo's own
  :func:`~chatpipe.demo.drive` at its rate (five tenants with event-stream listeners,
  attachments, sessions closed and opened, budgets that refuse, every ``/metrics`` read
  every 2 s, ``/health`` every 5 s), without its fault scenario, whose outages would make
  the services wait, not work.

py-spy gives the share of samples (:mod:`profile_share`). :func:`cpu_share` is the older
measure: the same turns through an instrumented pipeline and one with
``OTEL_SDK_DISABLED=true``, ``1 - cpu_off / cpu_on`` from psutil's CPU times (it moved
from 26% to -4% between two runs, so it is not in the full run).

    python bench/pipeline_cpu.py                  # chat turns one after another
    python bench/pipeline_cpu.py --cpu            # and then cpu_share
    python bench/pipeline_cpu.py --demo           # the demo's load, 60 s
    python bench/pipeline_cpu.py --demo --traces  # the same, every span exported
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from discard import discarding_receiver
from profile_share import Profiler, Share

from chatobs.stack import LocalStack
from chatpipe import demo
from chatpipe.launcher import Pipeline

__all__ = ["INSTRUMENTED", "Share", "cpu_share", "demo_share", "profiled_share", "traces_exported"]

SERVICES = ("gateway", "worker")
#: Every instrumented service of the pipeline (the simulators are not the product).
PIPELINE_SERVICES = (*SERVICES, "publisher", "replicator", "tool_executor")
#: Every trace sampled; budgets the measured traffic cannot exhaust.
INSTRUMENTED = {"OTEL_TRACES_SAMPLER": "always_on", "CHATPIPE_TOKEN_BUDGET": "100000000"}


def _drive(pipeline: Pipeline, turns: int) -> dict[str, float]:
    processes = {name: psutil.Process(pid) for name, pid in pipeline.pids().items() if name in SERVICES}
    before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
    with httpx.Client(base_url=pipeline.gateway_url, timeout=30) as http:
        session = http.post("/v1/sessions", headers={"X-Tenant-ID": "acme"}).json()["session_id"]
        for n in range(turns):
            http.post(f"/v1/sessions/{session}/messages", json={"content": f"turn {n}"}).raise_for_status()
            time.sleep(0.02)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the worker remembers every answered turn in Somabrain
            memories = http.get(f"{pipeline.somabrain_url}/memories", params={"session_id": session}).json()
            if memories["count"] >= turns:
                break
            time.sleep(0.5)
    return {name: sum(p.cpu_times()[:2]) - before[name] for name, p in processes.items()}


def cpu_share(turns: int = 200) -> dict[str, tuple[float, float]]:
    """``{service: (cpu seconds instrumented, cpu seconds with the SDK off)}``."""
    results: dict[str, tuple[float, float]] = {}
    env_on = INSTRUMENTED
    env_off = {**env_on, "OTEL_SDK_DISABLED": "true"}
    with LocalStack.from_environment() as stack, tempfile.TemporaryDirectory() as run_dir:
        measured = {}
        for label, env in (("on", env_on), ("off", env_off)):
            with Pipeline(stack.environment, Path(run_dir) / label, env=env) as pipeline:
                _drive(pipeline, 20)  # warm-up
                measured[label] = _drive(pipeline, turns)
        for name in SERVICES:
            results[name] = (measured["on"][name], measured["off"][name])
    return results


def profiled_share(turns: int = 200, env: dict[str, str] | None = None) -> dict[str, Share]:
    """py-spy's view: the share of the gateway's and the worker's CPU samples spent in
    instrumentation while ``turns`` chat turns go through an instrumented pipeline."""
    env = {**INSTRUMENTED, **(env or {})}
    with (
        LocalStack.from_environment() as stack,
        tempfile.TemporaryDirectory() as run_dir,
        Pipeline(stack.environment, Path(run_dir), env=env) as pipeline,
    ):
        _drive(pipeline, 20)  # warm-up
        pids = {name: pid for name, pid in pipeline.pids().items() if name in SERVICES}
        with Profiler(pids) as profiler:
            _drive(pipeline, turns)
        return profiler.results()


async def _demo_traffic(pipeline: Pipeline, seconds: float, rate: float) -> int:
    """``chatobs demo``'s traffic for ``seconds`` (see the module docstring); messages sent."""
    counters = demo.Counters()
    traffic = demo.Traffic(pipeline.gateway_url, counters)
    async with httpx.AsyncClient(base_url=pipeline.gateway_url, timeout=10) as http:
        try:
            await demo.drive(http, traffic, demo.Tracker(pipeline.metrics_urls), counters, rate=rate,
                             deadline=time.monotonic() + seconds)  # fmt: skip
        finally:
            traffic.stop()
    return counters.sent


def demo_share(
    seconds: float = 60, rate: float = 6.0, env: dict[str, str] | None = None
) -> tuple[dict[str, Share], int]:
    """py-spy's view under ``chatobs demo``'s load (``rate`` messages a second for ``seconds``,
    after a 10 s warm-up), for every pipeline service: ``({service: share}, messages sent
    while profiled)``. ``env`` is added to the demo's environment (a sampler, say)."""
    with (
        LocalStack.from_environment() as stack,
        tempfile.TemporaryDirectory() as run_dir,
        Pipeline(stack.environment, Path(run_dir), env={**demo.DEMO_ENV, **(env or {})}) as pipeline,
    ):
        asyncio.run(_demo_traffic(pipeline, 10, rate))  # warm-up
        pids = {name: pid for name, pid in pipeline.pids().items() if name in PIPELINE_SERVICES}
        with Profiler(pids) as profiler:
            sent = asyncio.run(_demo_traffic(pipeline, seconds, rate))
        return profiler.results(), sent


def traces_exported() -> contextlib.AbstractContextManager[dict[str, str]]:
    """The services' environment for shipping every span over OTLP to a receiver that discards
    them (in this process): what a service pays when a collector takes its traces."""
    return discarding_receiver()


def _print(results: dict[str, Share]) -> None:
    whole = Share.combined(results.values())
    print(f"whole pipeline: {whole.share:.1%} of {whole.samples} samples in instrumentation")
    for service, result in results.items():
        print(f"{service}: {result.share:.1%} of {result.samples} samples in instrumentation"
              f" ({result.serving_share:.1%} serving scrapes)")  # fmt: skip
        print("  " + ", ".join(f"{owner} {share:.1%}" for owner, share in result.owners()))
        for function, share in result.top(12):
            print(f"    {share:6.1%}  {function}")
        print("  entered through:")
        for function, share in result.entries(12):
            print(f"    {share:6.1%}  {function}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="the load of `chatobs demo` (60 s), not chat turns")
    parser.add_argument(
        "--traces",
        action="store_true",
        help="with --demo: every span exported over OTLP (to a receiver that discards them)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="without --demo: then psutil's CPU times, instrumented against OTEL_SDK_DISABLED",
    )
    args = parser.parse_args()
    if args.traces and not args.demo:
        parser.error("--traces goes with --demo")
    if args.cpu and args.demo:
        parser.error("--cpu measures the chat turns' load, not --demo's")
    return args


if __name__ == "__main__":
    arguments = _arguments()
    if arguments.demo and arguments.traces:
        with traces_exported() as exporting:
            shares, sent = demo_share(env=exporting)
        print(f"demo load, every span exported: {sent} messages")
        _print(shares)
        raise SystemExit
    if arguments.demo:
        shares, sent = demo_share()
        print(f"demo load: {sent} messages")
        _print(shares)
        raise SystemExit
    _print(profiled_share())
    if arguments.cpu:
        for service, (on, off) in cpu_share().items():
            print(f"{service}: {on:.2f} s instrumented, {off:.2f} s SDK off, share {1 - off / on:.1%}")
