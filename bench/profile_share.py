"""The share of a process's CPU samples spent in instrumentation, from py-spy.

py-spy samples the process's Python stacks, only those of the thread holding the GIL
(``--gil``): a thread waiting in ``epoll`` for the next request is not working, though
py-spy's idle detection, reading a running process without pausing it, often counts it as
active (it did here: up to 44% of a gateway's samples were such waits). A sample is charged
to instrumentation when its innermost frame outside the standard library belongs to
OpenTelemetry, chatobs or wrapt: a lock taken or a random id drawn by the SDK counts as
the SDK's, while the application's own work below an instrumentation wrapper (the wrapped
Redis command, the handler under the ASGI middleware) counts as the application's. A thread
that instrumentation runs (its outermost frame outside the standard library is
instrumentation's: the span processor's export thread, the metrics push, chatobs's
standalone metrics server) is instrumentation's whole, the libraries it calls included
(``requests`` and ``urllib3`` sending an OTLP export). The instrumentation's samples are
also split by whose code they were in (:data:`OWNERS`).

Example::

    with Profiler({"worker": pid}) as profiler:
        drive_load()
    for service, result in profiler.results().items():
        print(service, f"{result.share:.1%}", result.top(5))
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: Whose instrumentation code a frame is, by path fragment (first match).
OWNERS = (
    ("/opentelemetry/instrumentation/", "contrib instrumentations"),
    ("/opentelemetry/", "OpenTelemetry API and SDK"),
    ("/chatobs/", "chatobs"),
    ("/wrapt/", "wrapt"),
)
#: Path fragments of instrumentation code: any owner's.
INSTRUMENTATION = tuple(part for part, _ in OWNERS)
#: Frames of serving a scrape: the metrics server or route, the exposition, Telemetry.scrape.
_SERVING = ("/chatobs/server.py", "/chatobs/exposition.py")
_SCRAPE_FRAME = "Telemetry.scrape ("
_STDLIB = sysconfig.get_paths()["stdlib"]
#: The outermost frame of a thread other than the main thread (py-spy's raw stacks, root first).
_THREAD_START = f"({_STDLIB}/threading.py"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _owner(frame: str) -> str | None:
    """``"instrumentation"``, ``"application"``, or None for a standard-library/native frame."""
    match = _FRAME.match(frame)
    path = match.group("file") if match else frame
    if any(part in path for part in INSTRUMENTATION):
        return "instrumentation"
    if "site-packages" in path or not (path.startswith(_STDLIB) or path.startswith("<")):
        return "application"
    return None


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    return f"{match.group('function')} ({Path(match.group('file')).name})" if match else frame


@dataclass
class Share:
    samples: int = 0
    instrumentation: int = 0
    by_function: collections.Counter[str] = field(default_factory=collections.Counter)
    by_entry: collections.Counter[str] = field(default_factory=collections.Counter)
    by_owner: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Of the instrumentation's samples, those serving a scrape (``/metrics``), not recording.
    serving: int = 0

    @classmethod
    def combined(cls, results: Iterable[Share]) -> Share:
        """Several processes' samples as one (the whole pipeline's share: busy services weigh more)."""
        total = cls()
        for result in results:
            total.samples += result.samples
            total.instrumentation += result.instrumentation
            total.by_function.update(result.by_function)
            total.by_entry.update(result.by_entry)
            total.by_owner.update(result.by_owner)
            total.serving += result.serving
        return total

    @property
    def share(self) -> float:
        return self.instrumentation / self.samples if self.samples else 0.0

    @property
    def serving_share(self) -> float:
        """The samples spent serving scrapes, as a share of all samples (a part of :attr:`share`,
        which grows with the scrape rate, not with the traffic)."""
        return self.serving / self.samples if self.samples else 0.0

    def top(self, count: int = 8) -> list[tuple[str, float]]:
        """The instrumentation functions with the most samples, as shares of all samples."""
        return [(name, n / self.samples) for name, n in self.by_function.most_common(count)]

    def owners(self) -> list[tuple[str, float]]:
        """The instrumentation's samples by whose code they were in, as shares of all samples."""
        return [(name, n / self.samples) for name, n in self.by_owner.most_common()]

    def entries(self, count: int = 8) -> list[tuple[str, float]]:
        """Where the application entered the instrumentation that cost the most (the outermost
        instrumentation frame of each such sample), as shares of all samples."""
        return [(name, n / self.samples) for name, n in self.by_entry.most_common(count)]


def _serves_a_scrape(frames: list[str]) -> bool:
    return any(frame.startswith(_SCRAPE_FRAME) or any(part in frame for part in _SERVING) for frame in frames)


def share_of(raw: str) -> Share:
    """Classify py-spy ``--format raw`` output (``frame;frame;... count`` per line, root first)."""
    result = Share()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        result.samples += samples
        frames = stack.split(";")
        owners = [_owner(frame) for frame in frames]
        outermost = next((depth for depth, owner in enumerate(owners) if owner is not None), None)
        if outermost is not None and owners[outermost] == "instrumentation" and _THREAD_START in frames[0]:
            # A thread of the instrumentation's own: whatever it runs is its work. (Threads
            # only: in the event loop's thread a stack starts at its task's coroutine, and a
            # task may begin in a dispatcher whose wrapped call is the application's.)
            innermost = max(depth for depth, owner in enumerate(owners) if owner is not None)
            result.instrumentation += samples
            result.by_function[_short(frames[innermost])] += samples
            result.by_owner[next(name for part, name in OWNERS if part in frames[outermost])] += samples
            result.by_entry[_short(frames[outermost])] += samples
            result.serving += samples if _serves_a_scrape(frames) else 0
            continue
        for depth in range(len(frames) - 1, -1, -1):
            owner = owners[depth]
            if owner == "instrumentation":
                result.instrumentation += samples
                result.by_function[_short(frames[depth])] += samples
                result.by_owner[next(name for part, name in OWNERS if part in frames[depth])] += samples
                entry = depth
                while entry > 0 and owners[entry - 1] != "application":
                    entry -= 1
                result.by_entry[_short(frames[entry])] += samples
                result.serving += samples if _serves_a_scrape(frames) else 0
                break
            if owner == "application":
                break
    return result


#: py-spy's samples a second unless told otherwise.
DEFAULT_RATE = 1000


class Profiler:
    """py-spy attached to each ``{name: pid}`` until the ``with`` block ends, ``rate`` samples a
    second. By default it reads each stack while the process runs (``--nonblocking``: no cost
    to the process, but a stack may change while it is read); ``paused``, it stops the process
    for each sample, which costs the process, so use a lower ``rate``."""

    def __init__(self, pids: dict[str, int], rate: int = DEFAULT_RATE, paused: bool = False):
        executable = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(executable).exists():
            raise RuntimeError("py-spy not found: pip install py-spy")
        self._executable = executable
        self._pids = pids
        self._rate = rate
        self._paused = paused
        self._dir = tempfile.TemporaryDirectory()
        self._running: dict[str, subprocess.Popen[bytes]] = {}

    def _output(self, name: str) -> Path:
        return Path(self._dir.name) / f"{name}.txt"

    def __enter__(self) -> Profiler:
        for name, pid in self._pids.items():
            # Read running (the default) or with the process stopped for each sample: see the class doc.
            blocking = [] if self._paused else ["--nonblocking"]
            self._running[name] = subprocess.Popen(
                [self._executable, "record", "--pid", str(pid), "--rate", str(self._rate), "--format", "raw",
                 "--full-filenames", *blocking, "--gil", "--output", str(self._output(name))],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, process in self._running.items():
            process.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
            _, error = process.communicate(timeout=60)
            if not self._output(name).exists():
                raise RuntimeError(f"py-spy on {name} wrote nothing: {error.decode(errors='replace')[-500:]}")

    def results(self) -> dict[str, Share]:
        try:
            return {name: share_of(self._output(name).read_text()) for name in self._pids}
        finally:
            self._dir.cleanup()
