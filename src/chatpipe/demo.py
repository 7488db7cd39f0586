"""``chatobs demo``: the instrumented pipeline on the local stack, with live ``/metrics``.

Starts the local stack (or uses ``REDIS_URL``/``DATABASE_URL``/``KAFKA_BOOTSTRAP_SERVERS``),
the LLM and Somabrain simulators and every service; starts Prometheus with
``otel/prometheus.yml`` when the binary is installed; drives chat traffic from several
tenants through the gateway; plays a scenario (normal, Somabrain outage, recovery, LLM
error burst, backend blips, budget overruns); prints every ``/metrics`` URL; ends with
key metrics read back from the endpoints and the catalogue metrics that never moved.

Example::

    chatobs demo --duration 60 --rate 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from chatobs import catalogue
from chatobs.stack import LocalStack
from chatobs.terminal import on_hangup
from chatpipe.launcher import Pipeline
from chatpipe.prometheus import LocalPrometheus, PrometheusUnavailableError

__all__ = ["Counters", "Tracker", "Traffic", "drive", "register"]

#: Tenants the traffic comes from; `tiny` and `quota` have small budgets so overruns happen.
TENANTS = ("acme", "globex", "initech", "tiny", "quota")
#: A session's length in messages, drawn per session; then its user closes it (a DELETE) and
#: opens another. A fixed bound, not a chance per message: even the shortest run deletes
#: sessions (at 2% a message, a 60 s run of some 240 messages deleted none about once in a hundred).
SESSION_LENGTH = (10, 30)
DEMO_ENV = {
    "CHATPIPE_TENANT_TOKEN_BUDGETS": "tiny=400",
    "CHATPIPE_TENANT_MESSAGE_BUDGETS": "quota=3",
    "CHATPIPE_SOMABRAIN_TIMEOUT_SECONDS": "0.4",
    "CHATPIPE_BREAKER_RESET_SECONDS": "3",
    "CHATPIPE_DEGRADED_REPLAY_SECONDS": "1",
    "CHATPIPE_BACKLOG_POLL_SECONDS": "1",
}
#: Self-metrics that move only when chatobs itself fails, with OTLP push (the demo has none) the
#: collector does, or a scraper without credentials knocks (the demo's /metrics is open): staying
#: at 0 is the healthy outcome.
EXPECTED_STILL = {
    "chatobs_recording_errors_total",
    "chatobs_export_failures_total",
    "chatobs_spans_dropped_total",
    "chatobs_scrapes_refused_total",
    # Only a row too large to be sent moves it (tests/integration/test_publisher.py): the
    # gateway's CHATPIPE_MESSAGE_MAX_CHARS keeps every row within a Kafka request.
    "outbox_rows_parked_total",
}
_SUMMARY = (
    ("gateway", "chat_messages_in_total"),
    ("gateway", "sessions_created_total"),
    ("gateway", "attachments_uploaded_total"),
    ("worker", "llm_requests_total"),
    ("worker", "llm_tokens_total"),
    ("worker", "llm_errors_total"),
    ("worker", "somabrain_calls_total"),
    ("worker", "assistant_emitted_total"),
    ("worker", "tenant_budget_tokens_overruns_total"),
    ("worker", "tenant_budget_messages_overruns_total"),
    ("publisher", "wal_publish_errors_total"),
    ("tool_executor", "tool_calls_total"),
)
_CONTENTS = (
    "hello, how are you?",
    "tell me something about observability",
    "calc: 12*7",
    "what time is it?",
    "summarize: metrics are numbers over time; traces are requests across services; logs are events",
    "remind me what we talked about",
)


def register(commands: Any) -> None:
    """Add the ``demo`` subcommand to the ``chatobs`` CLI (entry point ``chatobs.commands``)."""
    demo = commands.add_parser("demo", help="run the instrumented pipeline on the local stack and drive traffic")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    demo.add_argument("--rate", type=float, default=6.0, help="chat messages per second (default 6)")
    demo.add_argument("--cycle", type=float, default=None,
                      help="seconds per scenario cycle (default: the duration, else 90)")  # fmt: skip
    demo.add_argument("--prometheus-config", default="otel/prometheus.yml",
                      help="scrape config for the demo's Prometheus (default otel/prometheus.yml)")  # fmt: skip
    demo.add_argument("--run-dir", default=None, help="where logs and data go (default: a temporary directory)")
    demo.set_defaults(run=lambda args: asyncio.run(_run(args)))


# -- what moved ------------------------------------------------------------------------
@dataclass
class Tracker:
    """Scrapes every service's /metrics and remembers which catalogue metrics ever moved."""

    urls: dict[str, str]
    moved: set[str] = field(default_factory=set)
    last: dict[str, str] = field(default_factory=dict)
    #: The services whose last scrape failed: what :attr:`last` holds of them is older.
    stale: set[str] = field(default_factory=set)

    async def poll(self, http: httpx.AsyncClient) -> None:
        for service, url in self.urls.items():
            try:
                text = (await http.get(url, timeout=5)).text
            except httpx.HTTPError:
                self.stale.add(service)
                continue
            self.stale.discard(service)
            self.last[service] = text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    name = sample.name
                    if family.type == "histogram" and name.endswith("_count"):
                        name = name.removesuffix("_count")
                    elif family.type == "histogram":
                        continue
                    if sample.value != 0:
                        self.moved.add(name)

    def total(self, service: str, name: str) -> float:
        text = self.last.get(service, "")
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def never_moved(self) -> list[str]:
        return [m.name for m in catalogue.CATALOGUE if m.name not in self.moved and m.name not in EXPECTED_STILL]


# -- traffic -----------------------------------------------------------------------------
@dataclass
class Counters:
    sent: int = 0
    replies: int = 0
    refused: int = 0
    errors: int = 0
    phase: str = "starting"


class Traffic:
    """Chat traffic through the gateway, with SSE listeners as the chat page has."""

    def __init__(self, gateway: str, counters: Counters):
        self.gateway = gateway
        self.counters = counters
        self.sessions: dict[str, str] = {}
        #: Messages each tenant's session has left before its user closes it and opens another.
        self._messages_left: dict[str, int] = {}
        self._listeners: dict[str, asyncio.Task[None]] = {}

    async def open_session(self, http: httpx.AsyncClient, tenant: str) -> None:
        old = self.sessions.pop(tenant, None)
        listener = self._listeners.pop(tenant, None)
        if listener is not None:
            listener.cancel()
        if old:
            with contextlib.suppress(httpx.HTTPError):
                await http.delete(f"/v1/sessions/{old}")
        # May fail during a backend blip: the tenant then has no session and the next message retries.
        response = await http.post("/v1/sessions", headers={"X-Tenant-ID": tenant})
        response.raise_for_status()
        self.sessions[tenant] = response.json()["session_id"]
        self._messages_left[tenant] = random.randint(*SESSION_LENGTH)  # noqa: S311 - load shaping
        self._listeners[tenant] = asyncio.create_task(self._listen(self.sessions[tenant]))

    async def _listen(self, session_id: str) -> None:
        url = f"{self.gateway}/v1/sessions/{session_id}/events"
        while True:
            try:
                async with (
                    httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as sse,
                    sse.stream("GET", url) as stream,
                ):
                    kind = ""
                    async for line in stream.aiter_lines():
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: ") and kind in ("message", "error"):
                            event = json.loads(line[6:])
                            if kind == "message":
                                self.counters.replies += 1
                            elif event.get("reason") == "budget":
                                self.counters.refused += 1
                            else:
                                self.counters.errors += 1
                    if stream.status_code in (404, 410):
                        return
                    # Any other end (a 503 during a backend blip, a stream timed out): come back
                    # after the gateway's Retry-After, as a browser's EventSource would, not at once.
                    retry_after = stream.headers.get("retry-after", "")
                    await asyncio.sleep(float(retry_after) if retry_after.isdigit() else 1.0)
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(1)

    async def send_one(self, http: httpx.AsyncClient) -> None:
        tenant = random.choice(TENANTS)  # noqa: S311 - load shaping, not security
        if tenant not in self.sessions or self._messages_left[tenant] <= 0:
            await self.open_session(http, tenant)
        self._messages_left[tenant] -= 1
        session = self.sessions[tenant]
        # A client type the deployment does not list yet shows up now and then: it is recorded as `other`.
        source = random.choice(("web", "web", "api", "cli", "mobile"))  # noqa: S311
        body = {"role": "user", "content": random.choice(_CONTENTS), "source": source}  # noqa: S311
        response = await http.post(f"/v1/sessions/{session}/messages", json=body)
        self.counters.sent += 1
        if response.status_code != 202:
            self.counters.errors += 1
        if random.random() < 0.1:  # noqa: S311
            files = {"file": ("notes.txt", b"some notes about the chat\n" * 20, "text/plain")}
            await http.post(f"/v1/sessions/{session}/attachments", files=files)

    def stop(self) -> None:
        for task in self._listeners.values():
            task.cancel()


# -- scenario ------------------------------------------------------------------------------
PHASES = (  # (start fraction of the cycle, name)
    (0.00, "normal"),
    (0.22, "Somabrain slow (timeouts)"),
    (0.32, "Somabrain down"),
    (0.42, "recovery"),
    (0.52, "LLM error burst"),
    (0.62, "backend blips"),
    (0.72, "normal"),
)


async def _scenario(pipeline: Pipeline, stack: LocalStack, counters: Counters, cycle: float,
                    http: httpx.AsyncClient) -> None:  # fmt: skip
    async def control(url: str, **faults: object) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await http.post(f"{url}/control", json=faults)

    started = time.monotonic()
    while True:
        for start, name in PHASES:
            await asyncio.sleep(max(0.0, started + start * cycle - time.monotonic()))
            counters.phase = name
            await control(pipeline.somabrain_url, hang=name.startswith("Somabrain slow"),
                          outage=name == "Somabrain down")  # fmt: skip
            await control(pipeline.llm_url, error_rates={"503": 0.5, "429": 0.2} if name == "LLM error burst" else {})
            if name == "backend blips":
                # Kafka stays down past the producer's 5 s request timeout, so deliveries really fail.
                for server, seconds in (("redis", 3.0), ("postgres", 2.0), ("kafka", 7.0)):
                    if server in stack.started:
                        await asyncio.to_thread(stack.stop_server, server)
                        await asyncio.sleep(seconds)
                        await asyncio.to_thread(stack.start_server, server)
        started += cycle
        await asyncio.sleep(max(0.0, started - time.monotonic()))


# -- Prometheus -------------------------------------------------------------------------------
@contextlib.contextmanager
def _prometheus(config_path: Path, pipeline: Pipeline, run_dir: Path, console: Console) -> Iterator[str | None]:
    if not config_path.exists():
        console.print(f"[dim]Prometheus not started ({config_path} not found)[/dim]")
        yield None
        return
    # A demo lasts minutes, not hours: scrape and evaluate every 2 seconds.
    prometheus = LocalPrometheus(config_path, pipeline.metrics_urls, run_dir, interval="2s")
    try:
        prometheus.start()
    except PrometheusUnavailableError as error:
        console.print(f"[dim]Prometheus not started ({error})[/dim]")
        yield None
        return
    try:
        yield prometheus.url
    finally:
        prometheus.stop()


# -- the run ------------------------------------------------------------------------------------
def _status(counters: Counters, elapsed: float, duration: float | None) -> Table:
    table = Table(show_header=False, box=None)
    left = f" / {duration:.0f}s" if duration else ""
    table.add_row("phase", f"[bold]{counters.phase}[/bold]", "elapsed", f"{elapsed:.0f}s{left}")
    table.add_row("sent", str(counters.sent), "replies", str(counters.replies))
    table.add_row("refused (budget)", str(counters.refused), "errors", str(counters.errors))
    return table


def _summary(tracker: Tracker) -> Table:
    table = Table(title="key metrics, read back from /metrics")
    table.add_column("service")
    table.add_column("metric")
    table.add_column("total", justify="right")
    for service, name in _SUMMARY:
        stale = " (stale: its last scrape failed)" if service in tracker.stale else ""
        table.add_row(service, name, f"{tracker.total(service, name):g}{stale}")
    return table


async def _run(args: argparse.Namespace) -> int:
    console = Console()
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="chatobs-demo-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    cycle = args.cycle or args.duration or 90.0
    counters = Counters()
    console.print(f"[bold]chatobs demo[/bold]: logs and data in {run_dir}")
    _stop_on_sigterm()
    # Started in this thread, not in a worker thread: a stop asked for meanwhile (Ctrl-C,
    # SIGTERM) then takes effect once they are up, instead of abandoning half-started servers.
    stack = LocalStack.from_environment().start(lambda message: console.print(f"  stack: {message}"))
    pipeline = Pipeline(stack.environment, run_dir, env=DEMO_ENV, progress=lambda m: console.print(f"  {m}"))
    tasks: list[asyncio.Task[Any]] = []
    traffic: Traffic | None = None
    tracker = Tracker({})
    failure: str | None = None
    codes: dict[str, int | None] = {}
    try:
        pipeline.start()
        tracker.urls = pipeline.metrics_urls
        with _prometheus(Path(args.prometheus_config), pipeline, run_dir, console) as prometheus_url:
            urls = Table(title="live endpoints")
            urls.add_column("service")
            urls.add_column("URL")
            urls.add_row("chat page", f"{pipeline.gateway_url}/")
            for service, url in pipeline.metrics_urls.items():
                urls.add_row(service, url)
            if prometheus_url:
                urls.add_row("Prometheus", prometheus_url)
            console.print(urls)

            def watch() -> None:
                dead = {**pipeline.dead(), **stack.dead()}
                for task in tasks:  # the scenario: a fault it could not undo (a server that did not restart)
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        dead["the scenario"] = f"failed: {task.exception()!r}"
                if dead:
                    raise ProcessDiedError("; ".join(f"{name} {what}" for name, what in dead.items()))

            async with httpx.AsyncClient(base_url=pipeline.gateway_url, timeout=10) as http:
                traffic = Traffic(pipeline.gateway_url, counters)
                tasks.append(asyncio.create_task(_scenario(pipeline, stack, counters, cycle, http)))
                failure = await _drive(http, traffic, tracker, counters, args, console, watch)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                traffic.stop()
                await asyncio.sleep(2)  # let the last replies and backlog measurements land
                await tracker.poll(http)
    finally:
        for task in tasks:
            task.cancel()
        if traffic:
            traffic.stop()
        # Blocking, so a second Ctrl-C or SIGTERM cannot cut the clean-up short.
        try:
            codes = pipeline.stop()
        finally:
            stack.stop()
    console.print(_summary(tracker))
    # uvicorn (the simulators) ends by raising the SIGTERM it was stopped with again: a clean stop too.
    failed = {name: code for name, code in codes.items() if code not in (0, -signal.SIGTERM)}
    if failed:
        console.print("[red]ended badly:[/red] " + ", ".join(
            f"{name} ({'killed after the stop timeout' if code is None else f'exit code {code}'})"
            for name, code in failed.items()))  # fmt: skip
    never = tracker.never_moved()
    if never:
        console.print(f"[yellow]catalogue metrics that never moved ({len(never)}):[/yellow] {', '.join(never)}")
    else:
        console.print("[green]every catalogue metric moved[/green] (chatobs_recording_errors_total, the "
                      "export and refused-scrape self-metrics stay 0 unless chatobs, a collector or a "
                      "scraper's credentials fail; outbox_rows_parked_total unless a row is too large to be "
                      "sent)")  # fmt: skip
    console.print("stopped: every process ended, stack data removed")
    return 1 if failure or failed else 0


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a supervisor, CI) and SIGHUP (its terminal closed) stop the demo as
    Ctrl-C does: the running task is cancelled and every server and service it started is
    stopped. Without this, Python's default for either ends the process at once and leaves the
    stack and the services, each in a session of its own, running."""
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here (Windows, a thread)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            loop.add_signal_handler(signal.SIGHUP, on_hangup(task.cancel))  # its output then goes nowhere


async def drive(http: httpx.AsyncClient, traffic: Traffic, tracker: Tracker, counters: Counters, *, rate: float,
                deadline: float | None = None, after_each: Callable[[], None] | None = None) -> None:  # fmt: skip
    """The demo's load until ``deadline`` (``time.monotonic()``; None: until cancelled): one
    message at a time, ``rate`` a second on average, every ``/metrics`` read every 2 s and
    ``/health`` every 5 s. A failed request is counted in ``counters.errors`` and the load
    goes on. ``bench/pipeline_cpu.py`` profiles the services under this same load.

    Example::

        await drive(http, Traffic(gateway_url, counters), Tracker(urls), counters, rate=6,
                    deadline=time.monotonic() + 60)
    """
    next_poll = next_health = time.monotonic()
    while deadline is None or time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_poll:
            await tracker.poll(http)
            next_poll = now + 2
        if now >= next_health:
            with contextlib.suppress(httpx.HTTPError):
                await http.get("/health")
            next_health = now + 5
        try:
            await traffic.send_one(http)
        except Exception:  # noqa: BLE001 - a failed request is part of the scenario, not the end of the demo
            counters.errors += 1
        if after_each is not None:
            after_each()
        await asyncio.sleep(random.expovariate(rate))


class ProcessDiedError(RuntimeError):
    """A service, simulator or stack server ended while the demo ran (and was not stopped by its scenario)."""


async def _drive(http: httpx.AsyncClient, traffic: Traffic, tracker: Tracker, counters: Counters,
                 args: argparse.Namespace, console: Console, watch: Callable[[], None]) -> str | None:  # fmt: skip
    """The demo's load until its duration or a stop; what died, if a process did (``watch`` raises)."""
    started = time.monotonic()
    deadline = started + args.duration if args.duration else None
    try:
        with Live(_status(counters, 0, args.duration), console=console, refresh_per_second=2) as live:

            def show() -> None:
                live.update(_status(counters, time.monotonic() - started, args.duration))
                watch()

            await drive(http, traffic, tracker, counters, rate=args.rate, deadline=deadline, after_each=show)
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("interrupted: stopping")
    except ProcessDiedError as died:
        console.print(f"[red]died:[/red] {died}\nstopping")
        return str(died)
    return None
