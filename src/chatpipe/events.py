"""Names and shapes shared by services that talk over Kafka and Redis (never by importing each other's code)."""

from __future__ import annotations

__all__ = ["ROLES", "TOOL_ABANDONED_TTL_SECONDS", "events_channel", "tool_abandoned_key", "tool_result_key"]

#: Roles a chat message may have.
ROLES = ("user", "assistant", "system", "tool")


def events_channel(session_id: str) -> str:
    """Redis pub/sub channel on which the worker streams a session's reply to the gateway."""
    return f"chat:events:{session_id}"


def tool_result_key(call_id: str) -> str:
    """Redis list where the tool executor leaves one tool call's result for the worker."""
    return f"tool:result:{call_id}"


#: How long a worker's "stopped waiting" mark (:func:`tool_abandoned_key`) is kept: a request
#: still in the executor's backlog after that is run (its result then expires unread).
TOOL_ABANDONED_TTL_SECONDS = 3600


def tool_abandoned_key(call_id: str) -> str:
    """Redis key a worker sets when it stops waiting for a tool call's result: the executor then
    does not run the call (a backlog after an outage), whatever the hosts' clocks say."""
    return f"tool:abandoned:{call_id}"
