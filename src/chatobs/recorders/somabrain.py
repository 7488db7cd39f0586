"""Somabrain and degraded mode, and the worker's turn latencies."""

from __future__ import annotations

import enum

from chatobs.recorders._base import Recorder, Timer, guarded

__all__ = ["CircuitState", "SomabrainRecorder"]


class CircuitState(enum.IntEnum):
    """Values of ``circuit_state``.

    Example::

        telemetry.somabrain.circuit_state("somabrain", CircuitState.OPEN)  # circuit_state 2
    """

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class SomabrainRecorder(Recorder):
    """Recording helpers for the conversation worker's Somabrain path.

    Example::

        soma = telemetry.somabrain
        with soma.time_context_build():
            memories = await recall(...)      # or the breaker says no:
        soma.call("circuit_open"); soma.bypass()
        soma.circuit_state("somabrain", CircuitState.OPEN)
        soma.assistant_emitted("degraded")
    """

    @guarded("somabrain_calls_total")
    def call(self, result: str) -> None:
        """One Somabrain call (success, timeout, circuit_open, skipped, error)."""
        self._add("somabrain_calls_total", 1, result)

    @guarded("somabrain_bypass_total")
    def bypass(self) -> None:
        """One reply answered without Somabrain."""
        self._add("somabrain_bypass_total", 1)

    @guarded("assistant_emitted_total")
    def assistant_emitted(self, mode: str = "normal") -> None:
        """One assistant reply emitted (``mode``: normal or degraded)."""
        self._add("assistant_emitted_total", 1, mode)

    @guarded("circuit_state")
    def circuit_state(self, component: str, state: CircuitState) -> None:
        self._set("circuit_state", int(CircuitState(state)), component)  # 0, 1 or 2, nothing else

    @guarded("context_build_seconds")
    def context_build(self, seconds: float) -> None:
        self._observe("context_build_seconds", seconds)

    def time_context_build(self) -> Timer:
        return Timer(self.context_build)

    @guarded("event_to_response_seconds")
    def event_to_response(self, seconds: float, mode: str = "normal") -> None:
        """User event accepted to assistant reply emitted."""
        self._observe("event_to_response_seconds", seconds, mode)
