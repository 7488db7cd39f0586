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
    python bench/pipeline_cpu.py --demo --paused --sample-rate 200  # stacks read paused
    python bench/pipeline_cpu.py --demo --gc      # and each service's garbage collections
    python bench/pipeline_cpu.py --demo --against 76f70d1 --pairs 3  # this checkout vs a commit

Two checks of the measure itself: ``--paused`` has py-spy stop each process for every
sample, so no stack changes while it is read (``--nonblocking``, the default, reads them
running; pausing costs the process, hence a lower rate); ``--gc`` times every garbage
collection in each service (``bench/gc_probe``: a collection runs inside whichever
allocation triggers it, and py-spy charges it to that line).

``--against REF`` runs the demo's load on this checkout and on commit ``REF``'s code in turn,
``--pairs`` times each (see ``checkouts``), and prints each side's median share and the
difference pair by pair: one run tells two versions apart only when they differ by more
than a run's spread, a point or so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from checkouts import CheckoutError, alternating, checkout_of, commit_of, services_from
from discard import discarding_receiver
from profile_share import DEFAULT_RATE, Profiler, Share

from chatobs.stack import LocalStack
from chatpipe import demo
from chatpipe.launcher import Pipeline

__all__ = [
    "INSTRUMENTED",
    "CollectionProbe",
    "Collections",
    "Share",
    "cpu_share",
    "demo_share",
    "profiled_share",
    "traces_exported",
]

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


@dataclass(frozen=True)
class Collections:
    """One service's garbage collections over the profiled minute (see ``gc_probe``)."""

    young: int  #: collections of generations 0 and 1
    young_seconds: float
    full: int  #: collections of generation 2
    full_seconds: float
    cpu_seconds: float  #: the process's CPU over the same time

    @property
    def young_share(self) -> float:
        return self.young_seconds / self.cpu_seconds if self.cpu_seconds else 0.0


class CollectionProbe:
    """The services' environment for ``gc_probe`` (``bench/gc_probe/sitecustomize.py``), and its
    readings: :meth:`reading` twice, and :meth:`between` them."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory()
        #: Each service's collections over the last :func:`demo_share`'s profiled time.
        self.last: dict[str, Collections] = {}

    def environment(self) -> dict[str, str]:
        # Ahead of any PYTHONPATH already set (a checkout run from a worktree, say), not instead.
        paths = [str(Path(__file__).with_name("gc_probe")), os.environ.get("PYTHONPATH", "")]
        return {"PYTHONPATH": os.pathsep.join(filter(None, paths)), "BENCH_GC_DIR": self._directory.name}

    def reading(self, pids: dict[str, int]) -> dict[str, dict[str, Any]]:
        time.sleep(1.5)  # the probes write once a second
        readings = {}
        for name, pid in pids.items():
            path = Path(self._directory.name) / f"{pid}.json"
            if not path.exists():
                raise RuntimeError(f"{name} wrote no garbage collection figures ({path}): was gc_probe imported?")
            readings[name] = json.loads(path.read_text())
        return readings

    @staticmethod
    def between(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Collections]:
        def moved(name: str, generations: tuple[str, ...], field: int) -> float:
            return sum(after[name]["collections"][g][field] - before[name]["collections"][g][field]
                       for g in generations)  # fmt: skip

        return {
            name: Collections(
                young=int(moved(name, ("0", "1"), 0)),
                young_seconds=moved(name, ("0", "1"), 1),
                full=int(moved(name, ("2",), 0)),
                full_seconds=moved(name, ("2",), 1),
                cpu_seconds=after[name]["cpu_seconds"] - before[name]["cpu_seconds"],
            )
            for name in after
        }

    def close(self) -> None:
        self._directory.cleanup()


def demo_share(
    seconds: float = 60,
    rate: float = 6.0,
    env: dict[str, str] | None = None,
    *,
    paused: bool = False,
    sample_rate: int = DEFAULT_RATE,
    collections: CollectionProbe | None = None,
) -> tuple[dict[str, Share], int]:
    """py-spy's view under ``chatobs demo``'s load (``rate`` messages a second for ``seconds``,
    after a 10 s warm-up), for every pipeline service: ``({service: share}, messages sent
    while profiled)``. ``env`` is added to the demo's environment (a sampler, say).
    ``paused``: py-spy stops each process for every sample (see :class:`Profiler`), at
    ``sample_rate`` samples a second. ``collections``: the services also time their garbage
    collections over the profiled time (read them with ``collections.last``)."""
    env = {**demo.DEMO_ENV, **(env or {}), **(collections.environment() if collections else {})}
    with (
        LocalStack.from_environment() as stack,
        tempfile.TemporaryDirectory() as run_dir,
        Pipeline(stack.environment, Path(run_dir), env=env) as pipeline,
    ):
        asyncio.run(_demo_traffic(pipeline, 10, rate))  # warm-up
        pids = {name: pid for name, pid in pipeline.pids().items() if name in PIPELINE_SERVICES}
        before = collections.reading(pids) if collections is not None else {}
        with Profiler(pids, rate=sample_rate, paused=paused) as profiler:
            sent = asyncio.run(_demo_traffic(pipeline, seconds, rate))
        if collections is not None:
            collections.last = CollectionProbe.between(before, collections.reading(pids))
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


def paired_lines(ref: str, runs: list[tuple[int, bool, dict[str, Share]]]) -> list[str]:
    """The comparison :func:`_against` prints: each side's median share, whole pipeline first,
    then each service, and this checkout's share less ``ref``'s pair by pair. ``runs`` are
    ``(pair, theirs, shares)``, in the order they ran."""

    def share(shares: dict[str, Share], service: str | None) -> float | None:
        if service is None:
            return Share.combined(shares.values()).share * 100
        return shares[service].share * 100 if service in shares else None

    services: list[str | None] = [None, *dict.fromkeys(name for _, _, shares in runs for name in shares)]
    lines = [f"{'':16}{'this checkout':>14}{ref:>14}   this less {ref}, pair by pair"]
    for service in services:
        sides: tuple[dict[int, float], dict[int, float]] = ({}, {})
        for pair, theirs, shares in runs:
            found = share(shares, service)
            if found is not None:
                sides[theirs][pair] = found
        ours, their = sides
        if not ours or not their:
            continue  # a service only one side ran
        differences = ", ".join(f"{ours[pair] - their[pair]:+.1f}" for pair in sorted(ours.keys() & their.keys()))
        lines.append(f"{service or 'whole pipeline':16}{statistics.median(ours.values()):13.1f}%"
                     f"{statistics.median(their.values()):13.1f}%   {differences}")  # fmt: skip
    return lines


def _against(arguments: argparse.Namespace) -> None:
    ref, pairs = arguments.against, arguments.pairs or 3
    runs: list[tuple[int, bool, dict[str, Share]]] = []
    with checkout_of(ref) as source:
        for pair, theirs in alternating(pairs):
            with services_from(source if theirs else None):
                shares, sent = demo_share(sample_rate=arguments.sample_rate or DEFAULT_RATE)
            runs.append((pair, theirs, shares))
            whole = Share.combined(shares.values())
            side = ref if theirs else "this checkout"
            print(f"pair {pair + 1}/{pairs}, {side}: {whole.share:.1%} of {whole.samples} samples in"
                  f" instrumentation, {sent} messages", flush=True)  # fmt: skip
    print("\n".join(paired_lines(ref, runs)))


def _print_collections(collections: dict[str, Collections]) -> None:
    for service, seen in collections.items():
        print(f"{service}: garbage collections {seen.young} young ({seen.young_seconds * 1000:.0f} ms, "
              f"{seen.young_share:.1%} of its {seen.cpu_seconds:.2f} s of CPU), {seen.full} full "
              f"({seen.full_seconds * 1000:.0f} ms)")  # fmt: skip


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
    parser.add_argument(
        "--paused",
        action="store_true",
        help="with --demo: py-spy stops each process for every sample (use a lower --sample-rate)",
    )
    parser.add_argument(
        "--sample-rate",
        type=_positive,
        metavar="HZ",
        help=f"with --demo: py-spy's samples a second (default: {DEFAULT_RATE})",
    )
    parser.add_argument(
        "--gc", action="store_true", help="with --demo: time each service's garbage collections over the profiled time"
    )
    parser.add_argument(
        "--against",
        metavar="REF",
        help="with --demo: this checkout and commit REF's code in turn, --pairs times each, side by side",
    )
    parser.add_argument("--pairs", type=_positive, metavar="N", help="with --against: runs of each side (default: 3)")
    args = parser.parse_args()
    for flag, given in (("--traces", args.traces), ("--paused", args.paused), ("--gc", args.gc),
                        ("--sample-rate", args.sample_rate is not None),
                        ("--against", args.against is not None)):  # fmt: skip
        if given and not args.demo:
            parser.error(f"{flag} goes with --demo")
    if args.pairs is not None and args.against is None:
        parser.error("--pairs goes with --against")
    if args.against is not None and (args.traces or args.paused or args.gc):
        parser.error("--against compares the plain demo load: not with --traces, --paused or --gc")
    if args.against is not None:
        try:
            commit_of(args.against)  # before minutes of benchmarking, not after the first run
        except CheckoutError as error:
            parser.error(str(error))
    if args.cpu and args.demo:
        parser.error("--cpu measures the chat turns' load, not --demo's")
    return args


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number, at least 1, not {text!r}")
    return int(text)


def _demo(arguments: argparse.Namespace) -> None:
    sample_rate = arguments.sample_rate or DEFAULT_RATE
    probe = CollectionProbe() if arguments.gc else None
    try:
        with traces_exported() if arguments.traces else contextlib.nullcontext({}) as exporting:
            shares, sent = demo_share(env=exporting, paused=arguments.paused, sample_rate=sample_rate,
                                      collections=probe)  # fmt: skip
        how = ", every span exported" if arguments.traces else ""
        how += f", stacks read paused at {sample_rate} Hz" if arguments.paused else ""
        print(f"demo load{how}: {sent} messages")
        _print(shares)
        if probe is not None:
            _print_collections(probe.last)
    finally:
        if probe is not None:
            probe.close()


if __name__ == "__main__":
    arguments = _arguments()
    if arguments.against is not None:
        _against(arguments)
        raise SystemExit
    if arguments.demo:
        _demo(arguments)
        raise SystemExit
    _print(profiled_share())
    if arguments.cpu:
        for service, (on, off) in cpu_share().items():
            print(f"{service}: {on:.2f} s instrumented, {off:.2f} s SDK off, share {1 - off / on:.1%}")
