"""Gateway traffic: messages, sessions, attachments, Server-Sent Events, enqueue latency."""

from __future__ import annotations

from chatobs.recorders._base import Recorder, Timer, checked_amount, guarded

__all__ = ["TrafficRecorder"]


class TrafficRecorder(Recorder):
    """Recording helpers for the gateway.

    Example::

        traffic = telemetry.traffic
        traffic.message_in(role="user", source="web")
        with traffic.time_enqueue():
            await store_in_outbox(message)
    """

    @guarded("chat_messages_in_total")
    def message_in(self, role: str, source: str) -> None:
        """One chat message accepted (``role``: user, assistant, system, tool)."""
        self._add("chat_messages_in_total", 1, role, source)

    @guarded("sessions_created_total")
    def session_created(self) -> None:
        self._add("sessions_created_total", 1)

    @guarded("sessions_deleted_total")
    def session_deleted(self) -> None:
        self._add("sessions_deleted_total", 1)

    @guarded("attachments_uploaded_total")
    def attachment_uploaded(self, seconds: float) -> None:
        """One attachment stored, having taken ``seconds`` to receive and store."""
        seconds = checked_amount(seconds)  # before recording anything: all or nothing
        self._add("attachments_uploaded_total", 1)
        self._observe("attachment_upload_seconds", seconds)

    @guarded("sse_clients_gauge")
    def sse_client_connected(self) -> None:
        self._move("sse_clients_gauge", 1)

    @guarded("sse_clients_gauge")
    def sse_client_disconnected(self) -> None:
        self._move("sse_clients_gauge", -1)

    @guarded("sse_stream_errors_total")
    def sse_stream_error(self, reason: str) -> None:
        """A stream ended in error (client_disconnect, timeout, backend_error), or skipped an event it could
        not read (encode_error: the stream goes on)."""
        self._add("sse_stream_errors_total", 1, reason)

    @guarded("chat_enqueue_seconds")
    def enqueue(self, seconds: float) -> None:
        """Request received to message stored durably."""
        self._observe("chat_enqueue_seconds", seconds)

    def time_enqueue(self) -> Timer:
        """``with traffic.time_enqueue(): ...`` records the block as ``chat_enqueue_seconds``."""
        return Timer(self.enqueue)
