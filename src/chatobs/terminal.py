"""What a long-running command does when its terminal goes away.

``chatobs stack up`` and ``chatobs demo`` start servers and services in sessions of their own
(a Ctrl-C is theirs to relay), so a closed terminal's SIGHUP reaches only the command: it
must stop them as on SIGTERM. By then the terminal is gone, and writing to it fails (EIO), so
its clean-up output would raise instead of being printed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["on_hangup"]


def on_hangup(stop: Callable[[], object]) -> Callable[..., None]:
    """A SIGHUP handler that points the standard output and error that are a terminal now at
    ``/dev/null`` (a file or pipe stays as it is), then calls ``stop``.

    Example::

        signal.signal(signal.SIGHUP, on_hangup(stopping.set))
        loop.add_signal_handler(signal.SIGHUP, on_hangup(task.cancel))
    """
    terminals = []
    for stream in (sys.stdout, sys.stderr):
        try:
            if os.isatty(stream.fileno()):  # asked now: once hung up, the terminal may not say so
                terminals.append(stream.fileno())
        except (AttributeError, OSError, ValueError):  # replaced, closed, or no file descriptor
            continue

    def hung_up(*_: object) -> None:
        if terminals:
            nowhere = os.open(os.devnull, os.O_WRONLY)
            try:
                for descriptor in terminals:
                    os.dup2(nowhere, descriptor)
            finally:
                os.close(nowhere)
        stop()

    return hung_up
