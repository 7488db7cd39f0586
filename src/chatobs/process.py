"""Process gauges: CPU time, resident memory, open file descriptors, data-dir disk free.

Read from ``/proc`` where it exists (Linux) with portable fallbacks; a source
that fails reports nothing for that scrape rather than failing it. With several
worker processes behind one scrape (``CHATOBS_MULTIPROCESS_DIR``) the process
answering the scrape reads every live worker's ``/proc/<pid>`` and labels each
series with its ``pid``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from opentelemetry.metrics import CallbackOptions, Observation

from chatobs.catalogue import PROCESS_LABEL
from chatobs.instruments import Instruments
from chatobs.multiprocess import proc_stat_fields

__all__ = ["register_process_metrics"]

_logger = logging.getLogger("chatobs")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = proc_stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of proc_pid_stat(5)


class _OwnProcFile:
    """A file of this process's ``/proc/<pid>``, kept open and read again with ``pread``: opening
    a ``/proc`` file was most of reading it (82 of 100 microseconds with cold caches, as a quiet
    service's scrape finds them). Opened again after a fork, whose inherited descriptor still
    reads the parent. Costs one descriptor, counted in ``process_open_fds``."""

    def __init__(self, name: str):
        self._name = name
        self._pid = 0
        self._fd = -1
        self._lock = threading.Lock()

    def read(self) -> bytes:
        pid = os.getpid()
        if pid != self._pid:
            with self._lock:
                self._reopen(pid)
        return os.pread(self._fd, 4096, 0)

    def _reopen(self, pid: int) -> None:
        if pid != self._pid:  # another thread may have done it meanwhile
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)  # the parent's, inherited through a fork
                self._fd = -1
            self._fd = os.open(f"/proc/{pid}/{self._name}", os.O_RDONLY | os.O_CLOEXEC)
            self._pid = pid


_OWN_STATM = _OwnProcFile("statm")


def _resident_bytes(pid: int | None) -> float:
    try:
        if pid is None:
            return int(_OWN_STATM.read().split()[1]) * _PAGE_SIZE
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        if pid is not None:
            raise
        # Peak, not current, resident size: the best the portable API offers (in KiB on
        # Linux, in bytes on macOS).
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _open_fds(pid: int | None) -> float:
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


Callback = Callable[[CallbackOptions], Iterable[Observation]]


def _reading(name: str, read: Callable[[int | None], float], pids: Callable[[], list[int]] | None) -> Callback:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        if pids is None:
            try:
                return (Observation(read(None)),)
            except Exception:
                _logger.debug("cannot read %s", name, exc_info=True)
                return ()
        observations = []
        for pid in pids():
            try:
                observations.append(Observation(read(pid), {PROCESS_LABEL: str(pid)}))
            except Exception:  # the worker exited between the listing and the read
                _logger.debug("cannot read %s of %d", name, pid, exc_info=True)
        return observations

    return callback


def register_process_metrics(
    instruments: Instruments, data_dir: Path, pids: Callable[[], list[int]] | None = None
) -> None:
    """Attach the process gauges' callbacks to ``instruments``: of this process, or, given
    ``pids`` (the live worker processes), one series per worker labelled ``pid``."""
    per_process: dict[str, Callable[[int | None], float]] = {
        "process_cpu_seconds_total": _cpu_seconds,
        "process_resident_memory_bytes": _resident_bytes,
        "process_open_fds": _open_fds,
    }
    for name, read in per_process.items():
        instruments.observe(name, _reading(name, read, pids))
    instruments.observe(
        "data_dir_free_bytes", _reading("data_dir_free_bytes", lambda _: shutil.disk_usage(data_dir).free, None)
    )
