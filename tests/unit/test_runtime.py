"""A service's loops and shutdown: every step of a shutdown runs, whatever the ones before it
did, and a service that lost one of its loops exits with a failure instead of idling on."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

import pytest

from chatpipe.runtime import close_in_order


def test_a_failing_or_hanging_step_does_not_skip_the_ones_after_it(caplog: pytest.LogCaptureFixture):
    done: list[str] = []

    async def hangs() -> None:
        await asyncio.sleep(60)

    async def fails() -> None:
        raise ConnectionError("broker gone")

    async def closes() -> None:
        done.append("pool")

    with caplog.at_level(logging.WARNING, logger="chatpipe"):
        asyncio.run(close_in_order(("consumer", hangs), ("producer", fails), ("pool", closes),
                                   ("telemetry", lambda: done.append("telemetry")), timeout=0.1))  # fmt: skip
    assert done == ["pool", "telemetry"], "the last push was skipped"
    assert "closing the consumer failed" in caplog.text and "closing the producer failed" in caplog.text


SERVICE = textwrap.dedent("""
    import asyncio
    from chatpipe.runtime import forever, run_service, run_until_stopped

    async def main():
        stopping = asyncio.Event()
        rounds = []

        async def publish():
            rounds.append(1)
            return False

        async def broken_pause(seconds):  # a notification channel that fails, as asyncpg's InterfaceError
            raise ConnectionError("connection is closed")

        async def dies():
            await asyncio.sleep(0.3)
            raise RuntimeError("the consumer went away")

        async def report():
            try:
                await run_until_stopped(stopping, forever("publish", publish, stopping, idle=0.01, backoff=0.01,
                                                          pause=broken_pause), dies(), grace=2)
            finally:
                print("rounds", len(rounds), "stopping", stopping.is_set(), flush=True)

        await report()

    run_service(main)
""")


def test_a_service_whose_loop_ends_early_stops_the_others_and_exits_with_a_failure():
    done = subprocess.run([sys.executable, "-c", SERVICE], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    rounds, stopping = done.stdout.split()[1], done.stdout.split()[3]
    assert int(rounds) > 3, "a failing pause ended the publish loop: it must back off and go on"
    assert stopping == "True", "the other loops were not told to stop"
    assert "a service loop ended before the service was stopped" in done.stderr
    assert "the consumer went away" in done.stderr
