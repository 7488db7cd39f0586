"""A backlog gauge whose measurement fails leaves the scrape, rather than showing an old value."""

from __future__ import annotations

import asyncio
import logging

import pytest

from chatobs import Telemetry, load_settings
from chatpipe.runtime import periodic


def _gauge(telemetry: Telemetry) -> float | None:
    """``degraded_buffer_size`` as a scrape shows it; None when the scrape leaves it out."""
    status, _, body = telemetry.scrape(None, None)
    assert status == 200
    lines = [line for line in body.decode().splitlines() if line.startswith("degraded_buffer_size ")]
    return float(lines[0].split()[1]) if lines else None


def test_a_failed_measurement_leaves_the_gauge_out_until_one_succeeds(caplog: pytest.LogCaptureFixture):
    telemetry = Telemetry(load_settings({}), service="worker")
    outcomes = ["ok", "slow", "down", "ok", "ok"]
    before: list[float | None] = []  # what a scrape showed before each measurement: after the one before
    stopping = asyncio.Event()

    async def measure() -> None:
        before.append(_gauge(telemetry))
        outcome = outcomes[len(before) - 1]
        if len(before) == len(outcomes):
            stopping.set()
        if outcome == "slow":
            await asyncio.sleep(1)  # past the time limit
        elif outcome == "down":
            raise ConnectionError("redis is down")
        telemetry.backlog.degraded_buffer_size(7)

    with caplog.at_level(logging.DEBUG, logger="chatpipe"):
        asyncio.run(periodic("degraded_buffer_size", measure, stopping, every=0.01, timeout=0.05,
                             on_failure=lambda: telemetry.backlog.unmeasured("degraded_buffer_size")))  # fmt: skip
    # Never measured, measured (7), timed out, down, measured again.
    assert before == [None, 7, None, None, 7]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning for a run of failures, not one per measurement"
    assert "measured again" in caplog.text
    telemetry.shutdown()


def test_unmeasured_takes_only_a_backlog_gauge_and_never_raises():
    telemetry = Telemetry(load_settings({}), service="worker")
    telemetry.backlog.degraded_buffer_size(3)
    telemetry.backlog.unmeasured("sessions_created_total")  # type: ignore[arg-type]
    telemetry.backlog.unmeasured(["degraded_buffer_size"])  # type: ignore[arg-type]
    assert _gauge(telemetry) == 3
    text = telemetry.scrape(None, None)[2].decode()
    assert 'chatobs_recording_errors_total{metric="other"} 2' in text
    telemetry.shutdown()
