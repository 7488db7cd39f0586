"""Shared plumbing of the recorders: label resolution and the never-raise guard."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from chatobs import catalogue
from chatobs.catalogue import OVERFLOW_VALUE
from chatobs.cells import CellStore, checked_amount
from chatobs.instruments import Instruments
from chatobs.labels import LabelPolicy

__all__ = ["Recorder", "Timer", "checked_amount", "guarded"]

_logger = logging.getLogger("chatobs")

P = ParamSpec("P")
R = TypeVar("R")

ErrorCallback = Callable[[str, BaseException], None]


def guarded(metric_name: str | Callable[..., str]) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """Make a recording method swallow its own failures.

    Instrumentation must never break the host: an exception raised while
    recording is logged (once per metric) and counted in
    ``chatobs_recording_errors_total{metric=...}``, and the caller carries on.
    ``metric_name`` may be a function of the method's arguments (``backend`` -> its metric).
    """
    if isinstance(metric_name, str):
        catalogue.get(metric_name)  # fail at import time on a typo, not at record time

    def decorate(method: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - recording must never raise into the app
                recorder: Recorder = args[0]  # type: ignore[assignment]
                name = metric_name if isinstance(metric_name, str) else _name_from(metric_name, args[1:], kwargs)
                recorder._on_error(name, exc)

        return wrapper

    return decorate


def _name_from(compute: Callable[..., str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    try:
        name = compute(*args, **kwargs)
        catalogue.get(name)
        return name
    except Exception:  # noqa: BLE001 - the arguments were the problem: still count the error
        return OVERFLOW_VALUE


def _never_raising(on_error: ErrorCallback) -> ErrorCallback:
    """``on_error`` made safe to call where a recording failed: if it raises too, that is logged
    (at debug: it would repeat on every recording) and swallowed, never raised into the app."""

    def report(metric_name: str, error: BaseException) -> None:
        try:
            on_error(metric_name, error)
        except Exception:  # the error path itself must not raise
            _logger.debug("chatobs: the on_error hook failed on %s", metric_name, exc_info=True)

    return report


class Timer:
    """Context manager measuring wall time with ``perf_counter`` and handing it to ``record``.

    Exceptions of the timed block propagate unchanged; the duration is recorded
    either way. ``seconds`` holds the measured value after the block.
    """

    __slots__ = ("_record", "_start", "seconds")

    def __init__(self, record: Callable[[float], None]):
        self._record = record
        self._start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.seconds = time.perf_counter() - self._start
        self._record(self.seconds)


class Recorder:
    """Base of the domain recorders: holds the instruments and the label policy."""

    def __init__(self, instruments: Instruments, labels: LabelPolicy, on_error: ErrorCallback, cells: CellStore):
        self._instruments = instruments
        self._labels = labels
        self._on_error = _never_raising(on_error)
        # The hot path: counters and histograms go to bound cells (see chatobs.cells).
        self._cell_add = cells.add
        self._cell_observe = cells.observe
        self._cell_move = cells.move
        self._cell_set = cells.set

    def _add(self, metric_name: str, amount: float, *values: str) -> None:
        self._cell_add(metric_name, amount, values)

    def _observe(self, metric_name: str, value: float, *values: str) -> None:
        # The exemplar is the current span's. A caller outside the measured span (a span
        # processor, a per-record path) calls the cell itself, with the span's context
        # positionally: `_cell_observe(name, value, labels, None, span_context)`.
        self._cell_observe(metric_name, value, values)

    def _move(self, metric_name: str, amount: int, *values: str) -> None:
        """Move an up-down counter (a gauge moved by increments of the recorder's own choosing)."""
        self._cell_move(metric_name, amount, values)

    def _set(self, metric_name: str, value: float, *values: str) -> None:
        """Set a gauge; ``value`` must pass :func:`checked_amount` (every catalogue gauge is a
        count, an allowance or a state: never negative), else nothing is recorded."""
        self._cell_set(metric_name, checked_amount(value), values)
