"""chatobs benchmarks: ratios against prometheus_client and an uninstrumented service,
measured side by side in one run (this machine is noisy; absolute times are not stable).

    python bench/run.py           # full run (a few minutes)
    python bench/run.py --quick   # under 2 minutes: fewer iterations and rounds

The last line is machine-readable:
``recording_ratio=<x> histogram_ratio=<x> http_ratio=<x> scrape_ratio=<x> scrape_bytes_ratio=<x>``
(lower is better except ``http_ratio``). Results go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asgi_overhead
import discard
import instructions
import micro
import pipeline_cpu
import throughput

#: CPU profiles under the demo's load in a full run (one has a few hundred to a few thousand
#: samples per service, about +-2 points): three, and their median.
PROFILES = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, under 2 minutes")
    args = parser.parse_args()
    iterations, rounds = (30_000, 3) if args.quick else (200_000, 7)
    http_seconds, http_rounds = (2, 3) if args.quick else (5, 7)
    # Redirected to a file, rich would wrap the table at 80 columns: its labels are long.
    console = Console(width=None if sys.stdout.isatty() else 200)
    started = time.monotonic()
    rows: list[micro.Comparison] = []

    # Recorded with the OTLP push configured as well as the scrape (to a receiver that
    # discards what it is sent), as in a service that ships its metrics to a collector.
    with console.status("recording"), discard.discarding_receiver(metrics=True) as receiver:
        recording = micro.recording(iterations, rounds, receiver)
        histogram = micro.histogram(iterations, rounds, receiver)
        rows += [recording, histogram]
        for series in (100, 1_000, 10_000):
            rows.append(micro.push(series, max(3, rounds // 2), receiver))
    # The headline scrape is the one where every histogram series moved since the last
    # (chatobs renders a series again only then); the quiet one, nothing moved, follows it.
    scrape_times, scrape_bytes = {}, {}
    for series in (100, 1_000, 10_000):
        with console.status(f"/metrics at {series} series"):
            time_cmp, bytes_cmp, lean_time, lean_bytes = micro.scrape(series, max(3, rounds // 2), changed=True)
            quiet = micro.scrape(series, max(3, rounds // 2))[0]
        scrape_times[series], scrape_bytes[series] = time_cmp, bytes_cmp
        rows += [time_cmp, quiet, bytes_cmp, lean_time, lean_bytes]
    with console.status("memory per series"):
        rows.append(micro.memory_per_series(2_000 if args.quick else 10_000))
    with console.status("HTTP throughput, side by side on one core (wrk)"), \
            discard.discarding_receiver(metrics=True) as receiver:  # fmt: skip
        http = throughput.side_by_side_ratios(
            {"full": throughput.FULL, "exported": throughput.exported(receiver),
             "sampled": throughput.SAMPLED_10_PERCENT,
             "sampled, exported": {**throughput.exported(receiver), **throughput.SAMPLED_10_PERCENT},
             "sdk": throughput.FULL_SDK_TRACER},
            seconds=http_seconds, rounds=http_rounds,
        )  # fmt: skip
    one_after_the_other = None
    if not args.quick:  # the earlier method, for comparison with earlier runs
        with console.status("HTTP throughput, one server after the other (wrk)"):
            one_after_the_other = throughput.http_ratios({"full": throughput.FULL}, http_seconds, http_rounds)
    with console.status("cost per request in one process (ASGI, no server)"):
        per_request = asgi_overhead.measure(rounds)
    counted = None
    if not args.quick and instructions.available():
        with console.status("instructions per request in one process (callgrind)"):
            counted = instructions.per_request()
    with console.status("idle service memory"):
        idle_rss, idle_rss_off = throughput.idle_rss_bytes(), throughput.idle_rss_bytes(throughput.OFF)

    table = Table(title=f"chatobs vs baseline ({'quick' if args.quick else 'full'} run)")
    for column in ("measure", "chatobs", "baseline", "unit", "ratio"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    for row in rows:
        table.add_row(row.name, f"{row.ours:,.1f}", f"{row.baseline:,.1f}", row.unit, f"{row.ratio:.2f}")
    http_rows = {"full": "full setup, every trace sampled (no trace exporter: spans not recorded)",
                 "exported": "the same, every span and a metric push every 5 s shipped over OTLP",
                 "sampled": "full setup, 10% of traces sampled",
                 "sampled, exported": "the same, those spans and a metric push every 5 s shipped over OTLP",
                 "sdk": "full setup, every trace sampled, SDK tracer (spans recorded, no exporter)"}  # fmt: skip
    for variant, label in http_rows.items():
        low, high = http.spread[variant]
        table.add_row(f"HTTP rps: {label}; side by side on one core, each at about half of it "
                      f"(median of {http_rounds} rounds, which ranged {low:.2f}-{high:.2f})",
                      f"{http.rps[variant]:,.0f}", f"{http.rps['off']:,.0f}", "req/s",
                      f"{http.ratios[variant]:.2f}")  # fmt: skip
    if one_after_the_other is not None:
        low, high = one_after_the_other.spread["full"]
        table.add_row(f"HTTP rps: {http_rows['full']}; one server after the other, each with the machine to "
                      f"itself (median of {http_rounds} paired rounds, which ranged {low:.2f}-{high:.2f})",
                      f"{one_after_the_other.rps['full']:,.0f}", f"{one_after_the_other.rps['off']:,.0f}", "req/s",
                      f"{one_after_the_other.ratios['full']:.2f}")  # fmt: skip
    for variant in ("lean tracer", "SDK tracer"):
        table.add_row(f"app cost per request, full setup ({variant}) vs off, in one process",
                      f"{per_request[variant]:.1f}", f"{per_request['off']:.1f}", "µs",
                      f"+{per_request[variant] - per_request['off']:.1f} µs")  # fmt: skip
    if counted is not None:
        for variant in ("lean tracer", "SDK tracer"):
            table.add_row(f"instructions per request, full setup ({variant}) vs off, in one process (callgrind)",
                          f"{counted[variant]:,.0f}", f"{counted['off']:,.0f}", "instr.",
                          f"{counted[variant] / counted['off']:.3f}")  # fmt: skip
    elif not args.quick:
        console.print("valgrind not found (apt-get install -y valgrind): no instruction counts")
    table.add_row("idle service RSS, instrumented vs OTEL_SDK_DISABLED", f"{idle_rss / 2**20:,.1f}",
                  f"{idle_rss_off / 2**20:,.1f}", "MiB", f"+{(idle_rss - idle_rss_off) / 2**20:,.1f} MiB")  # fmt: skip
    if not args.quick:
        _profile_rows(table, console)
    console.print(table)
    growth = " -> ".join(f"{n}: {scrape_times[n].ours:.1f} ms" for n in sorted(scrape_times))
    console.print(f"/metrics cost as series grow: {growth}")
    console.print(f"{platform.node()} {platform.machine()} python {platform.python_version()}, "
                  f"{time.monotonic() - started:.0f} s")  # fmt: skip
    print(
        f"recording_ratio={recording.ratio:.2f} histogram_ratio={histogram.ratio:.2f} "
        f"http_ratio={http.ratios['full']:.2f} scrape_ratio={scrape_times[10_000].ratio:.2f} "
        f"scrape_bytes_ratio={scrape_bytes[10_000].ratio:.2f}"
    )
    return 0


def _profile_rows(table: Table, console: Console) -> None:
    """The instrumentation's share of each service's CPU samples (py-spy, GIL held): under
    ``chatobs demo``'s load (three runs; once with 10% of traces sampled; once with every span
    exported over OTLP) and turn by turn."""
    runs: dict[str, list[pipeline_cpu.Share]] = {}
    for attempt in range(1, PROFILES + 1):
        with console.status(f"instrumentation's share of CPU under the demo's load (py-spy, {attempt}/{PROFILES})"):
            shares, _ = pipeline_cpu.demo_share()
        for service, result in shares.items():
            runs.setdefault(service, []).append(result)
    with console.status("the same with 10% of traces sampled"):
        sampled, _ = pipeline_cpu.demo_share(env=throughput.SAMPLED_10_PERCENT)
    with console.status("the same with every span exported over OTLP"), pipeline_cpu.traces_exported() as exporting:
        exported, _ = pipeline_cpu.demo_share(env=exporting)
    with console.status("turn by turn: 400 chat turns, no listeners or scrapes"):
        turns = pipeline_cpu.profiled_share(turns=400)

    def row(label: str, result: pipeline_cpu.Share) -> None:
        table.add_row(label, f"{result.instrumentation:,}", f"{result.samples:,}", "samples", f"{result.share:.1%}")

    def serving_row(service: str, result: pipeline_cpu.Share) -> None:
        table.add_row(f"{service}: of which serving scrapes (the demo's, every 2 s)", f"{result.serving:,}",
                      f"{result.samples:,}", "samples", f"{result.serving_share:.1%}")  # fmt: skip

    runs["whole pipeline"] = [pipeline_cpu.Share.combined(run) for run in zip(*runs.values(), strict=True)]
    sampled["whole pipeline"] = pipeline_cpu.Share.combined(sampled.values())
    exported["whole pipeline"] = pipeline_cpu.Share.combined(exported.values())
    for service, results in runs.items():
        each = ", ".join(f"{r.share:.1%}" for r in results)
        median = sorted(results, key=lambda result: result.share)[len(results) // 2]
        row(f"{service}: CPU samples in instrumentation, demo load 60 s (py-spy; median of {each})", median)
        serving_row(service, median)
        row(f"{service}: the same, 10% of traces sampled", sampled[service])
        row(f"{service}: the same, every span exported over OTLP (to a receiver that discards them)",
            exported[service])  # fmt: skip
    for service, result in turns.items():
        row(f"{service}: turn by turn, 400 chat turns 20 ms apart, no listeners or scrapes", result)


if __name__ == "__main__":
    raise SystemExit(main())
