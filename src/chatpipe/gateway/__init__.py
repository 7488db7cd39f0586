"""The gateway: HTTP ingress, sessions, messages (outbox), attachments, SSE, the chat page.

Run: ``python -m chatpipe.gateway`` (exits 0 after a graceful SIGTERM) or ``uvicorn chatpipe.gateway:app``
(the app is built, from the environment, on first access).
"""

from typing import Any

from chatpipe.gateway.service import create_app

__all__ = ["app", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from chatpipe.gateway import service

        return service.app
    raise AttributeError(name)
