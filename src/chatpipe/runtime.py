"""What every non-HTTP service process shares: graceful stop on SIGTERM/SIGINT, and
background loops that must survive their backends' outages.

Example::

    async def main() -> None:
        stopping = install_stop_signals()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(forever("publish", publish_round, stopping, idle=0.1))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["forever", "install_stop_signals", "periodic", "run_service", "sleep_unless_stopped"]

_logger = logging.getLogger("chatpipe")


def install_stop_signals() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT (the service then finishes in-flight work)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    return stopping


async def sleep_unless_stopped(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, waking early when the service is asked to stop."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


async def forever(name: str, step: Callable[[], Awaitable[bool]], stopping: asyncio.Event, *, idle: float,
                  backoff: float = 1.0) -> None:  # fmt: skip
    """Run ``step`` until ``stopping``: again at once when it did work (returned True), after
    ``idle`` when it did not, after ``backoff`` when it failed (a backend is down: keep going)."""
    while not stopping.is_set():
        try:
            busy = await step()
        except Exception:
            _logger.warning("%s: round failed; retrying in %.1fs", name, backoff, exc_info=True)
            await sleep_unless_stopped(stopping, backoff)
            continue
        if not busy:
            await sleep_unless_stopped(stopping, idle)


async def periodic(name: str, step: Callable[[], Awaitable[None]], stopping: asyncio.Event, *, every: float,
                   timeout: float) -> None:  # fmt: skip
    """Run ``step`` every ``every`` seconds, each run bounded by ``timeout`` (a gauge poller)."""
    while not stopping.is_set():
        try:
            await asyncio.wait_for(step(), timeout)
        except Exception:
            _logger.debug("%s: measurement failed", name, exc_info=True)
        await sleep_unless_stopped(stopping, every)


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Entry point of a service process: timestamped log lines, then ``main`` until it stops."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main())
