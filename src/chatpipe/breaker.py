"""A circuit breaker that reports its state to ``circuit_state{component}``.

Closed: calls go through; ``failure_threshold`` consecutive failures open it. Open: calls
are refused for ``reset_seconds``, then one trial call is let through (half-open); its
success closes the circuit, its failure opens it again. Every call :meth:`allow` lets
through must end in :meth:`succeeded`, :meth:`failed` or :meth:`abandoned`, whatever
goes wrong in it: until the trial ends, no other call is let through.

Example::

    breaker = CircuitBreaker("somabrain", telemetry.somabrain, failure_threshold=3, reset_seconds=5)
    if breaker.allow():
        try:
            result = await call()
        except Exception:
            breaker.failed()
        except BaseException:  # cancelled
            breaker.abandoned()
            raise
        else:
            breaker.succeeded()
"""

from __future__ import annotations

import time

from chatobs import CircuitState
from chatobs.recorders import SomabrainRecorder

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    def __init__(self, component: str, recorder: SomabrainRecorder, *, failure_threshold: int, reset_seconds: float):
        self.component = component
        self._recorder = recorder
        self._threshold = failure_threshold
        self._reset_seconds = reset_seconds
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.state = CircuitState.CLOSED
        recorder.circuit_state(component, self.state)

    def _move(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            self._recorder.circuit_state(self.component, state)

    def allow(self) -> bool:
        """May a call go through now?"""
        if self.state is CircuitState.OPEN and time.monotonic() - self._opened_at >= self._reset_seconds:
            self._move(CircuitState.HALF_OPEN)
        if self.state is CircuitState.HALF_OPEN:
            if self._trial_in_flight:
                return False
            self._trial_in_flight = True
            return True
        return self.state is CircuitState.CLOSED

    def would_allow(self) -> bool:
        """Would :meth:`allow` let a call through now? Asking changes nothing (no trial begins)."""
        if self.state is CircuitState.OPEN:
            return time.monotonic() - self._opened_at >= self._reset_seconds
        return self.state is CircuitState.CLOSED or not self._trial_in_flight

    def succeeded(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        self._move(CircuitState.CLOSED)

    def abandoned(self) -> None:
        """The call let through ended with no verdict (it was cancelled): the next call may be the trial."""
        self._trial_in_flight = False

    def failed(self) -> None:
        self._failures += 1
        self._trial_in_flight = False
        if self.state is CircuitState.HALF_OPEN or self._failures >= self._threshold:
            self._opened_at = time.monotonic()
            self._move(CircuitState.OPEN)
