"""Process gauges: CPU time, resident memory, open file descriptors, data-dir disk free.

Read from ``/proc`` where it exists (Linux) with portable fallbacks; a source
that fails reports nothing for that scrape rather than failing it.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from opentelemetry.metrics import CallbackOptions, Observation

from chatobs.instruments import Instruments

__all__ = ["register_process_metrics"]

_logger = logging.getLogger("chatobs")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _resident_bytes() -> float:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        # Peak, not current, resident size: the best the portable API offers.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _open_fds() -> float:
    return len(os.listdir("/proc/self/fd"))


def _reading(name: str, read: Callable[[], float]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        try:
            return (Observation(read()),)
        except Exception:
            _logger.debug("cannot read %s", name, exc_info=True)
            return ()

    return callback


def register_process_metrics(instruments: Instruments, data_dir: Path) -> None:
    """Attach the process gauges' callbacks to ``instruments``."""
    sources: dict[str, Callable[[], float]] = {
        "process_cpu_seconds_total": _cpu_seconds,
        "process_resident_memory_bytes": _resident_bytes,
        "process_open_fds": _open_fds,
        "data_dir_free_bytes": lambda: shutil.disk_usage(data_dir).free,
    }
    for name, read in sources.items():
        instruments.observe(name, _reading(name, read))
