"""Health checks and tool calls."""

from __future__ import annotations

from chatobs.recorders._base import Recorder, checked_amount, guarded

__all__ = ["HealthRecorder", "ToolRecorder"]


class HealthRecorder(Recorder):
    """Example: ``telemetry.health.check("postgres", ok=True)``."""

    @guarded("health_checks_total")
    def check(self, component: str, *, ok: bool) -> None:
        self._add("health_checks_total", 1, component, "ok" if ok else "fail")


class ToolRecorder(Recorder):
    """Example: ``telemetry.tools.call("calculator", "success", seconds=0.004)``."""

    @guarded("tool_calls_total")
    def call(self, tool: str, result: str, *, seconds: float) -> None:
        """One tool call (``result``: success, error, timeout, rejected)."""
        seconds = checked_amount(seconds)  # before recording anything: all or nothing
        self._add("tool_calls_total", 1, tool, result)
        self._observe("tool_call_seconds", seconds, tool)

    @guarded("tool_calls_total")
    def abandoned(self, tool: str) -> None:
        """A request not run: the worker had stopped waiting for its result (no duration: nothing ran)."""
        self._add("tool_calls_total", 1, tool, "abandoned")
