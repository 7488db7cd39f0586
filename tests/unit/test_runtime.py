"""A service's shutdown runs every step, whatever the ones before it did."""

from __future__ import annotations

import asyncio
import logging

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
