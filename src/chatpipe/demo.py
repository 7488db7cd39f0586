"""``chatobs demo``: run the instrumented service locally and drive traffic through it.

Example::

    chatobs demo --duration 30 --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import time
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["register"]

_TENANTS = ("acme", "globex", "initech")
_SOURCES = ("web", "api", "cli")
_SUMMARY = ("sessions_created_total", "chat_messages_in_total", "chat_enqueue_seconds_count")


def register(commands: Any) -> None:
    """Add the ``demo`` subcommand to the ``chatobs`` CLI (entry point ``chatobs.commands``)."""
    demo = commands.add_parser("demo", help="run the instrumented example service and drive traffic through it")
    demo.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    demo.add_argument("--rate", type=float, default=10.0, help="messages per second (default 10)")
    demo.set_defaults(run=lambda args: asyncio.run(_run(args)))


def _summary(text: str) -> Table:
    table = Table(title="key metrics, read back from /metrics")
    table.add_column("series")
    table.add_column("value", justify="right")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _SUMMARY:
                labels = ",".join(f"{k}={v}" for k, v in sample.labels.items())
                table.add_row(f"{sample.name}{{{labels}}}" if labels else sample.name, f"{sample.value:g}")
    return table


async def _drive(base: str, rate: float, deadline: float | None, progress: Progress, task: Any) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
        sessions = []
        for tenant in _TENANTS:
            response = await client.post("/v1/sessions", headers={"X-Tenant-ID": tenant})
            sessions.append(response.json()["session_id"])
        sent = 0
        while deadline is None or time.monotonic() < deadline:
            session = random.choice(sessions)  # noqa: S311 - load shaping, not security
            body = {"role": "user", "content": f"hello {sent}", "source": random.choice(_SOURCES)}  # noqa: S311
            await client.post(f"/v1/sessions/{session}/messages", json=body)
            sent += 1
            progress.update(task, advance=1, description=f"{sent} messages sent")
            await asyncio.sleep(1.0 / rate)


async def _run(args: argparse.Namespace) -> int:
    from chatpipe.example import create_app

    console = Console()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.05)
    base = f"http://{host}:{port}"
    console.print(f"example gateway: {base}   metrics: [bold]{base}/metrics[/bold]   (Ctrl-C to stop)")
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("starting", total=None)
            await _drive(base, args.rate, deadline, progress, task)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        async with httpx.AsyncClient(timeout=5.0) as client:
            metrics_text = (await client.get(f"{base}/metrics")).text
        console.print(_summary(metrics_text))
        server.should_exit = True
        await serving
    return 0
