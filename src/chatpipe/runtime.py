"""What every non-HTTP service process shares: graceful stop on SIGTERM/SIGINT, and
background loops that must survive their backends' outages.

Example::

    async def main() -> None:
        stopping = install_stop_signals()
        await run_until_stopped(stopping, forever("publish", publish_round, stopping, idle=0.1), grace=5)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = [
    "LoopEndedError",
    "close_in_order",
    "forever",
    "freeze_startup_objects",
    "install_stop_signals",
    "periodic",
    "run_service",
    "run_until_stopped",
    "sleep_unless_stopped",
]

_logger = logging.getLogger("chatpipe")


class LoopEndedError(RuntimeError):
    """A service loop ended, or failed, before the service was asked to stop: the process must
    exit with a failure, so its supervisor starts it again, rather than idle on without it."""


def freeze_startup_objects() -> None:
    """Take what exists once a service is up out of the garbage collector's walks.

    Modules, the app, settings, pools and clients live as long as the process. Left in the
    collector's oldest generation, every full collection walks them all: a 40-130 ms stall
    of the event loop on this project's machine kind, charged to whatever request happened
    to allocate at that moment. ``gc.freeze()`` moves them to a permanent generation;
    objects created later are collected as before.
    """
    gc.collect()  # what start-up left as garbage goes now, rather than being frozen with the rest
    gc.freeze()


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
                  backoff: float = 1.0, pause: Callable[[float], Awaitable[None]] | None = None) -> None:  # fmt: skip
    """Run ``step`` until ``stopping``: again at once when it did work (returned True), after
    ``idle`` when it did not, after ``backoff`` when it failed (a backend is down: keep going).
    ``pause(seconds)`` waits instead of sleeping after an idle round (one that can end early,
    when new work is announced); it must return when ``stopping`` is set."""
    pause = pause or (lambda seconds: sleep_unless_stopped(stopping, seconds))
    while not stopping.is_set():
        try:
            if not await step():
                await pause(idle)  # a pause that fails (its notification channel, say) is a failed round too
        except Exception:
            _logger.warning("%s: round failed; retrying in %.1fs", name, backoff, exc_info=True)
            await sleep_unless_stopped(stopping, backoff)


async def close_in_order(*steps: tuple[str, Callable[[], object]], timeout: float = 10.0) -> None:
    """A service's shutdown: each ``(name, close)`` in turn, each bounded by ``timeout`` if it
    returns an awaitable. One that fails or hangs is logged and the next still runs, so the
    last (the telemetry's final push) always does.

    Example::

        await close_in_order(("consumer", consumer.stop), ("pool", pool.close), ("telemetry", telemetry.shutdown))
    """
    for name, close in steps:
        try:
            result = close()
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, timeout)
        except Exception as error:  # noqa: BLE001 - the steps after it must still run
            _logger.warning("stopping: closing the %s failed (%r); going on", name, error)


async def periodic(name: str, step: Callable[[], Awaitable[object]], stopping: asyncio.Event, *, every: float,
                   timeout: float, on_failure: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Run ``step`` every ``every`` seconds, each run bounded by ``timeout`` (a gauge poller);
    ``on_failure()`` after a run that failed or timed out (a gauge then shows no stale value).
    The first failure after a success is logged as a warning, the rest until the next success
    at debug level: a backend that stays slow does not flood the log."""
    failing = False
    while not stopping.is_set():
        try:
            await asyncio.wait_for(step(), timeout)
        except Exception as error:  # noqa: BLE001 - any failure leaves the gauge unmeasured; the poller goes on
            if on_failure is not None:
                on_failure()
            log = _logger.debug if failing else _logger.warning
            log("%s: measurement failed (%r; limit %.1fs); retrying every %.1fs", name, error, timeout, every,
                exc_info=failing)  # fmt: skip
            failing = True
        else:
            if failing:
                _logger.info("%s: measured again", name)
            failing = False
        await sleep_unless_stopped(stopping, every)


async def run_until_stopped(stopping: asyncio.Event, *loops: Coroutine[Any, Any, None], grace: float) -> None:
    """Run the service's ``loops`` (:func:`forever`, :func:`periodic`) until ``stopping``; then give
    the work they have in flight ``grace`` seconds to finish, and cancel what is left. What
    exists when it starts is frozen first (:func:`freeze_startup_objects`).

    Cancelled work is work not acknowledged: a Kafka record not committed comes again to the
    next consumer, an outbox transaction rolled back leaves its rows pending. So a stop is
    prompt even when a turn waits on a slow tool or a produce on a dead broker, and loses nothing.

    A loop that ends before ``stopping`` is set (it returned, or raised) stops the others the
    same way, then raises :class:`LoopEndedError`: a service missing one of its loops would
    otherwise look alive, or exit with success, and not be started again.
    """
    freeze_startup_objects()
    tasks = [asyncio.create_task(loop) for loop in loops]
    waiter = asyncio.create_task(stopping.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    ended_early = [task for task in tasks if task.done()] if not stopping.is_set() else []
    if ended_early:
        stopping.set()  # the other loops finish their work in flight, as on SIGTERM
    _, unfinished = await asyncio.wait(tasks, timeout=grace)
    if unfinished:
        _logger.warning("stopping: %d loop(s) still busy after %.1fs; cancelling (their work comes again)",
                        len(unfinished), grace)  # fmt: skip
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
    waiter.cancel()
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            _logger.error("a service loop ended with an error", exc_info=task.exception())
    if ended_early:
        first = ended_early[0]
        error = None if first.cancelled() else first.exception()
        raise LoopEndedError(f"a service loop ended before the service was stopped ({error!r})") from error


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Entry point of a service process: timestamped log lines, then ``main`` until it stops.
    A loop that ended early (:class:`LoopEndedError`) exits with status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(main())
    except LoopEndedError as error:
        _logger.critical("%s; exiting", error)
        raise SystemExit(1) from None
