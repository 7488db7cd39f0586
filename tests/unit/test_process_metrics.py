"""Process metrics read what the scraped process is using now, also in a forked worker."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families

from chatobs import Telemetry, load_settings

_MB = 1024 * 1024


def _resident(telemetry: Telemetry) -> float:
    text = telemetry.scrape()[2].decode()
    for family in text_string_to_metric_families(text):
        if family.name == "process_resident_memory_bytes":
            return family.samples[0].value
    raise AssertionError("process_resident_memory_bytes not in the scrape")


def test_resident_memory_follows_the_process_and_a_forked_child():
    telemetry = Telemetry(load_settings({}), service="worker")
    try:
        before = _resident(telemetry)
        grown = bytearray(96 * _MB)
        grown[::4096] = b"x" * len(grown[::4096])  # touched: resident, not only reserved
        assert _resident(telemetry) >= before + 80 * _MB
        del grown

        reading, writing = os.pipe()
        child = os.fork()
        if child == 0:  # a worker forked after the first scrape, as a pre-fork server makes them
            try:
                own = bytearray(192 * _MB)
                own[::4096] = b"y" * len(own[::4096])
                os.write(writing, str(_resident(telemetry)).encode())
            finally:
                os._exit(0)
        os.close(writing)
        child_value = float(os.read(reading, 64).decode())
        os.close(reading)
        os.waitpid(child, 0)
        assert child_value >= _resident(telemetry) + 150 * _MB, "the child read its parent's memory"
    finally:
        telemetry.shutdown()
