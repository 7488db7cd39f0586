"""Instrumentation's share of CPU under pipeline load, measured side by side.

The same chat traffic goes through two pipelines on one local stack: one instrumented
(every trace sampled, metrics, exemplars) and one with ``OTEL_SDK_DISABLED=true`` (the
recording helpers still run, so this slightly undercounts). The share is
``1 - cpu_off / cpu_on`` for the gateway and the worker, from psutil's CPU times.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from profile_share import Profiler, Share

from chatobs.stack import LocalStack
from chatpipe.launcher import Pipeline

__all__ = ["INSTRUMENTED", "Share", "cpu_share", "profiled_share"]

SERVICES = ("gateway", "worker")
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


if __name__ == "__main__":
    for service, result in profiled_share().items():
        print(f"{service}: {result.share:.1%} of {result.samples} samples in instrumentation")
        print("  " + ", ".join(f"{owner} {share:.1%}" for owner, share in result.owners()))
        for function, share in result.top(12):
            print(f"    {share:6.1%}  {function}")
        print("  entered through:")
        for function, share in result.entries(12):
            print(f"    {share:6.1%}  {function}")
    if "--cpu" in sys.argv:
        for service, (on, off) in cpu_share().items():
            print(f"{service}: {on:.2f} s instrumented, {off:.2f} s SDK off, share {1 - off / on:.1%}")
