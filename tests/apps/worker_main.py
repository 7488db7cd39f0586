"""A service without HTTP: `chatobs.setup()` called twice, metrics on CHATOBS_METRICS_PORT."""

from __future__ import annotations

import signal
import sys
import threading

import chatobs

first = chatobs.setup(service="worker")
second = chatobs.setup(service="worker")  # must be harmless: same handle, no second server
first.llm.request("sim", "simulator")
second.llm.request("sim", "simulator")
first.llm.latency(0.3, "sim", "simulator")
print("ready", flush=True)

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
sys.exit(0)  # atexit runs telemetry.shutdown(), which flushes push exporters
