"""Names and shapes shared by services that talk over Kafka and Redis (never by importing each other's code)."""

from __future__ import annotations

__all__ = ["ROLES", "events_channel", "tool_result_key"]

#: Roles a chat message may have.
ROLES = ("user", "assistant", "system", "tool")


def events_channel(session_id: str) -> str:
    """Redis pub/sub channel on which the worker streams a session's reply to the gateway."""
    return f"chat:events:{session_id}"


def tool_result_key(call_id: str) -> str:
    """Redis list where the tool executor leaves one tool call's result for the worker."""
    return f"tool:result:{call_id}"
