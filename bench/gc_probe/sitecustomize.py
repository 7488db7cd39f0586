"""Times every garbage collection of a process started with this directory on ``PYTHONPATH``
and ``BENCH_GC_DIR`` set (``bench/pipeline_cpu.py --demo --gc`` does both): once a second,
``$BENCH_GC_DIR/<pid>.json`` gets the collections so far by generation (count, thread CPU
seconds) and the process's CPU seconds. Without ``BENCH_GC_DIR`` it does nothing.

A collection runs inside whichever allocation triggers it, so a sampling profiler charges it
to that line, instrumentation's or the application's: this says how much there is to charge.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time

_DIRECTORY = os.environ.get("BENCH_GC_DIR")


def _install(directory: str) -> None:
    collections = {generation: [0, 0.0] for generation in range(3)}
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()  # the collecting thread's CPU: no wait counted
            return
        totals = collections[info["generation"]]
        totals[0] += 1
        totals[1] += time.thread_time() - started[0]

    def dump() -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{os.getpid()}.json")
        while True:
            time.sleep(1)
            state = {"collections": collections, "cpu_seconds": time.process_time()}
            with open(path + ".tmp", "w") as file:
                json.dump(state, file)
            os.replace(path + ".tmp", path)  # a reader never sees half a file

    gc.callbacks.append(timed)
    threading.Thread(target=dump, name="bench-gc-probe", daemon=True).start()


if _DIRECTORY:
    _install(_DIRECTORY)
