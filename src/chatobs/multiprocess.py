"""Several worker processes behind one ``/metrics``: every process's cells in a shared directory.

Under ``gunicorn -k uvicorn.workers.UvicornWorker -w 4`` or ``uvicorn --workers 4`` each request
is served by one of several processes, and so is each scrape. With ``CHATOBS_MULTIPROCESS_DIR``
set, every process writes each cell's values through to its own memory-mapped file there (a
recording stays a few hundred nanoseconds: one ``struct.pack_into``), and the process answering
a scrape reads the files of every process of its server and combines them as the catalogue's
:class:`~chatobs.catalogue.Combine` says: counters and histograms sum over every process that
ever ran (a killed worker's requests still happened), gauges over the live ones.

Files are named ``<server pid>.<server start time>-<pid>.<its start time>.cells``, so a new
worker given a dead one's pid never truncates the dead one's counts; the server is the parent
process (the gunicorn arbiter, uvicorn's supervisor), so a restarted server never adds the
previous one's counts, even with the same pid (a container's pid 1 restarted over a directory
that outlived it), and files whose server has exited are removed when the next one starts. A
process is live while its pid exists with the start time written in its file's header (a
reused pid is not mistaken for it).

File layout, little-endian::

    header  b"CHOB", u32 version, u64 bytes used, u64 process start time, u64 reserved
    record  u32 key length, u32 slot count, key (UTF-8 JSON, zero-padded to 8 bytes), f64 slots

A record is written completely before the header's "bytes used" moves past it, so a reader
never sees half a record.

Example::

    directory = ProcessDirectory(Path("/run/chatobs"))
    offset = directory.own.allocate(series_key("requests_total", {"route": "/"}), slots=1)
    directory.own.write(offset, 1.0)
    directory.snapshot().combined("requests_total", Combine.SUM)   # {'{"route": "/"}': [1.0]}
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from chatobs.catalogue import Combine

__all__ = [
    "ProcessDirectory",
    "ProcessFile",
    "Snapshot",
    "proc_stat_fields",
    "renew_in_forked_child",
    "series_key",
    "split_key",
]

_logger = logging.getLogger("chatobs")

_MAGIC = b"CHOB"
_VERSION = 1
_HEADER = struct.Struct("<4sIQQQ")
_RECORD = struct.Struct("<II")
_SLOT = struct.Struct("<d")
_USED_OFFSET = 8
_INITIAL_SIZE = 64 * 1024
_SUFFIX = ".cells"


_Owner = TypeVar("_Owner")


def renew_in_forked_child(owner: _Owner, renew: Callable[[_Owner], None]) -> None:
    """Call ``renew(owner)`` in every child forked while ``owner`` lives (``gunicorn --preload``
    forks a process that built the app): what only the parent's threads could release, or
    what belongs to the parent, is replaced there. The hook cannot be unregistered, so it holds
    ``owner`` weakly.

    Example::

        renew_in_forked_child(self, Reader._renew_lock)
    """
    if not hasattr(os, "register_at_fork"):  # no fork there (Windows): nothing to renew
        return
    ref = weakref.ref(owner)

    def hook() -> None:
        alive = ref()
        if alive is not None:
            renew(alive)

    os.register_at_fork(after_in_child=hook)


def series_key(metric_name: str, attributes: dict[str, str]) -> str:
    """The key of one series in a process file: metric name and label set, as JSON."""
    return json.dumps([metric_name, attributes], ensure_ascii=False, separators=(",", ":"))


def split_key(key: str) -> tuple[str, dict[str, str]]:
    name, attributes = json.loads(key)
    return name, attributes


def proc_stat_fields(pid: int) -> list[bytes]:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (Linux; ``proc_pid_stat(5)``): index 0 is field 3.
    Raises ``OSError`` where the process or ``/proc`` is not there."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        # The command name (field 2) may hold spaces and parentheses: split after its last ")".
        return stat.read().rsplit(b")", 1)[1].split()


def _stat(pid: int) -> tuple[str, int] | None:
    """The process's state letter and start time in clock ticks since boot."""
    try:
        fields = proc_stat_fields(pid)
        return fields[0].decode(), int(fields[19])  # fields 3 and 22
    except (OSError, IndexError, ValueError):
        return None


def _start_time(pid: int) -> int:
    """The process's start time, 0 where unknown."""
    stat = _stat(pid)
    return stat[1] if stat else 0


def _server(pid: int) -> tuple[int, int]:
    """What identifies a server: its pid with its start time (a restarted one may reuse the pid)."""
    return pid, _start_time(pid)


def _is_alive(pid: int, start_time: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc: the signal check is all there is
    state, started = stat
    # A killed worker is a zombie until its server reaps it; a reused pid started later.
    return state != "Z" and (start_time == 0 or started == start_time)


class ProcessFile:
    """This process's values, written through to a memory-mapped file other processes read."""

    def __init__(self, directory: Path, server_pid: int, pid: int | None = None, server_start: int | None = None):
        self.pid = os.getpid() if pid is None else pid
        server_start = _start_time(server_pid) if server_start is None else server_start
        own_start = _start_time(self.pid)
        # The process's start time too: a new worker given a dead one's pid must not truncate
        # the dead one's file, whose counts still belong in the sums.
        self.path = directory / f"{server_pid}.{server_start}-{self.pid}.{own_start}{_SUFFIX}"
        self._lock = threading.Lock()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _INITIAL_SIZE)
            self._mm = mmap.mmap(fd, _INITIAL_SIZE)
        finally:
            os.close(fd)  # the mapping keeps the file open
        self._used = _HEADER.size
        _HEADER.pack_into(self._mm, 0, _MAGIC, _VERSION, self._used, own_start, 0)

    def allocate(self, key: str, slots: int) -> int:
        """Append a record of ``slots`` zeroed values for ``key``; returns the first slot's offset."""
        encoded = key.encode("utf-8", "surrogatepass")
        padded = -(-len(encoded) // 8) * 8
        size = _RECORD.size + padded + slots * _SLOT.size
        with self._lock:
            start = self._used
            if start + size > len(self._mm):
                self._mm.resize(max(2 * len(self._mm), start + size))  # the new space reads as zeros
            _RECORD.pack_into(self._mm, start, len(encoded), slots)
            self._mm[start + _RECORD.size : start + _RECORD.size + len(encoded)] = encoded
            self._used = start + size
            # Published last: a reader stops at the previous end until the record is whole.
            struct.pack_into("<Q", self._mm, _USED_OFFSET, self._used)
        return start + _RECORD.size + padded

    def write(self, offset: int, value: float) -> None:
        _SLOT.pack_into(self._mm, offset, value)

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()


def _read(path: Path) -> tuple[int, dict[str, tuple[float, ...]]] | None:
    """A process file's start time and its records, or ``None`` if it is not one."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, version, used, start_time, _ = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC or version != _VERSION:
        return None
    records: dict[str, tuple[float, ...]] = {}
    position = _HEADER.size
    end = min(used, len(data))
    while position + _RECORD.size <= end:
        key_length, slots = _RECORD.unpack_from(data, position)
        key_start = position + _RECORD.size
        values_start = key_start + -(-key_length // 8) * 8
        position = values_start + slots * _SLOT.size
        if position > end:
            break
        key = data[key_start : key_start + key_length].decode("utf-8", "surrogatepass")
        records[key] = struct.unpack_from(f"<{slots}d", data, values_start)
    return start_time, records


@dataclass(frozen=True)
class ProcessValues:
    pid: int
    alive: bool
    records: dict[str, tuple[float, ...]]


class Snapshot:
    """Every process file of one server, read once, combined per metric on demand."""

    def __init__(self, processes: list[ProcessValues]):
        self.processes = processes
        # metric name -> [(process, series key, values)]: one pass over the records per scrape.
        self._by_metric: dict[str, list[tuple[ProcessValues, str, tuple[float, ...]]]] = {}
        for process in processes:
            for key, values in process.records.items():
                name = key[2 : key.find('"', 2)]  # keys start with ["<metric name>"
                self._by_metric.setdefault(name, []).append((process, key, values))

    @property
    def live_pids(self) -> list[int]:
        return sorted(process.pid for process in self.processes if process.alive)

    def combined(self, metric_name: str, combine: Combine) -> dict[str, list[float]]:
        """Series key → combined slot values of ``metric_name`` (``SUM``, ``LIVE_SUM``, ``LIVE_MAX``)."""
        result: dict[str, list[float]] = {}
        for process, key, values in self._by_metric.get(metric_name, ()):
            if combine is not Combine.SUM and not process.alive:
                continue
            current = result.get(key)
            if current is None:
                result[key] = list(values)
            elif combine is Combine.LIVE_MAX:
                result[key] = [max(a, b) for a, b in zip(current, values, strict=False)]
            else:
                result[key] = [a + b for a, b in zip(current, values, strict=False)]
        return result


class ProcessDirectory:
    """The shared directory: this process's file, and the snapshot of its server's files.

    Example::

        directory = ProcessDirectory(Path(os.environ["CHATOBS_MULTIPROCESS_DIR"]))
        snapshot = directory.snapshot()
    """

    def __init__(self, path: Path, server_pid: int | None = None):
        self.path = path
        self._server = _server(os.getppid() if server_pid is None else server_pid)
        self._remove_finished_servers()
        self.own = self._own_file()

    @property
    def server_pid(self) -> int:
        return self._server[0]

    def _own_file(self) -> ProcessFile:
        return ProcessFile(self.path, self.server_pid, server_start=self._server[1])

    def _files(self) -> Iterator[tuple[tuple[int, int], int, Path]]:
        """``((server pid, server start time), pid, path)`` of each process file.

        Raises ``OSError`` when the directory cannot be listed (``Path.glob`` would find
        nothing in a directory that went away, and a scrape would show every count at zero).
        """
        with os.scandir(self.path) as entries:
            names = [entry.name for entry in entries if entry.name.endswith(_SUFFIX)]
        for name in names:
            server, _, process = name[: -len(_SUFFIX)].partition("-")
            server_pid, _, server_start = server.partition(".")
            server_start = server_start or "0"  # named by an earlier version: `<server pid>-<pid>`
            pid = process.partition(".")[0]  # `<pid>.<its start time>`, or `<pid>` (earlier versions)
            if server_pid.isdigit() and server_start.isdigit() and pid.isdigit():
                yield (int(server_pid), int(server_start)), int(pid), self.path / name

    def _remove_finished_servers(self) -> None:
        """Files of servers that have exited: their counts ended with them. A server is gone
        when no process has its pid with its start time (a reused pid started later)."""
        checked: dict[tuple[int, int], bool] = {}
        for server, _pid, path in self._files():
            if server == self._server:
                continue
            if server not in checked:
                checked[server] = _is_alive(*server)
            if not checked[server]:
                with contextlib.suppress(OSError):
                    path.unlink()

    def snapshot(self) -> Snapshot:
        """Every process file of this server, read. Raises ``OSError`` when the directory, or
        this process's own file in it, is gone: what it would show is not what was counted."""
        processes = []
        if not self.own.path.exists():
            raise FileNotFoundError(f"{self.own.path} is gone")
        for server, pid, path in self._files():
            if server != self._server:
                continue  # another server sharing the directory (or one still shutting down)
            read = _read(path)
            if read is None:
                continue
            start_time, records = read
            alive = pid == self.own.pid or _is_alive(pid, start_time)
            processes.append(ProcessValues(pid, alive, records))
        return Snapshot(processes)

    def reopen(self) -> None:
        """After a fork: this process's own file, under the new parent (the forking server)."""
        self._server = _server(os.getppid())
        self.own = self._own_file()

    def close(self) -> None:
        self.own.close()
