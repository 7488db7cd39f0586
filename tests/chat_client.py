"""A chat client for tests: talks to the gateway exactly as the chat page does."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx


class ChatClient:
    def __init__(self, gateway: str, tenant: str = "acme"):
        self.gateway = gateway
        self.tenant = tenant
        self.http = httpx.Client(base_url=gateway, timeout=30)

    def new_session(self) -> str:
        response = self.http.post("/v1/sessions", headers={"X-Tenant-ID": self.tenant})
        response.raise_for_status()
        return response.json()["session_id"]

    def turn(self, session_id: str, content: str, timeout: float = 30.0) -> tuple[dict[str, Any], list[str]]:
        """Send ``content`` with the SSE stream open; return the final event and the streamed tokens."""
        tokens: list[str] = []
        with (
            httpx.Client(timeout=timeout) as sse,
            sse.stream("GET", f"{self.gateway}/v1/sessions/{session_id}/events") as stream,
        ):
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            self.http.post(f"/v1/sessions/{session_id}/messages",
                           json={"role": "user", "content": content, "source": "web"}).raise_for_status()  # fmt: skip
            kind = None
            deadline = time.monotonic() + timeout
            for line in lines:
                if time.monotonic() > deadline:
                    break
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: ") and kind:
                    event = json.loads(line.removeprefix("data: "))
                    if kind == "token":
                        tokens.append(event["text"])
                    elif kind in ("message", "error"):
                        return event, tokens
        raise AssertionError(f"no reply within {timeout}s")


def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy; its last exception or value explains a failure."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError as error:
            last = error
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout}s: {what} (last: {last!r})")


def in_background(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread
