"""Typed recording helpers, one module per domain. They never raise."""

from chatobs.recorders.backlog import BacklogRecorder
from chatobs.recorders.budgets import BudgetRecorder
from chatobs.recorders.clients import ClientRecorder
from chatobs.recorders.health import HealthRecorder, ToolRecorder
from chatobs.recorders.llm import LLMRecorder, llm_error_code
from chatobs.recorders.somabrain import CircuitState, SomabrainRecorder
from chatobs.recorders.traffic import TrafficRecorder

__all__ = [
    "BacklogRecorder",
    "BudgetRecorder",
    "CircuitState",
    "ClientRecorder",
    "HealthRecorder",
    "LLMRecorder",
    "SomabrainRecorder",
    "ToolRecorder",
    "TrafficRecorder",
    "llm_error_code",
]
