"""Steady chat load from a thread, and what the replicated store holds: shared by the resilience tests."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import httpx


@dataclass
class SteadyLoad:
    """Chat messages posted at a steady rate from a thread; what the gateway answered is kept."""

    gateway: str
    sessions: list[str]
    interval: float = 0.12  # about 8 messages a second
    content: Callable[[int], str] = field(default=lambda number: f"steady message {number}")
    accepted: list[str] = field(default_factory=list)  # message ids of 2xx answers
    statuses: Counter[int] = field(default_factory=Counter)
    refusals: list[dict[str, object]] = field(default_factory=list)  # 503 bodies
    unexpected: list[str] = field(default_factory=list)  # other statuses: never expected
    transport_errors: list[str] = field(default_factory=list)  # no answer (the gateway restarting)
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: threading.Event = field(default_factory=threading.Event)  # cleared: paused
    _idle: threading.Lock = field(default_factory=threading.Lock)  # held while a message is in flight
    _thread: threading.Thread | None = None

    def start(self) -> SteadyLoad:
        self._running.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # A generous timeout: a request given up on by the client might still have been stored.
        with httpx.Client(base_url=self.gateway, timeout=20) as client:
            number = 0
            while not self._stop.is_set():
                if not self._running.wait(timeout=0.1):
                    continue
                session = self.sessions[number % len(self.sessions)]
                number += 1
                try:
                    with self._idle:
                        content = self.content(number)
                        response = client.post(
                            f"/v1/sessions/{session}/messages", json={"content": content, "source": "api"}
                        )
                except httpx.HTTPError as error:
                    self.transport_errors.append(f"message {number}: {error!r}")
                else:
                    self.statuses[response.status_code] += 1
                    if response.status_code == 202:
                        self.accepted.append(response.json()["message_id"])
                    elif response.status_code == 503:
                        self.refusals.append(response.json())
                    else:
                        self.unexpected.append(f"message {number}: {response.status_code} {response.text[:200]}")
                self._stop.wait(self.interval)

    def pause(self) -> None:
        """No new message after this returns (one in flight is waited for)."""
        self._running.clear()
        with self._idle:
            pass

    def resume(self) -> None:
        self._running.set()

    def accepted_count(self) -> int:
        return len(self.accepted)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def stored(database_url: str) -> tuple[int, set[str], int]:
    """(rows, distinct message ids) of the replicated store, and outbox rows not yet confirmed."""

    async def query() -> tuple[int, set[str], int]:
        connection = await asyncpg.connect(database_url)
        try:
            ids = [row["message_id"] for row in await connection.fetch("select message_id from replicated_messages")]
            unconfirmed = await connection.fetchval("select count(*) from outbox where confirmed_at is null")
            return len(ids), set(ids), unconfirmed
        finally:
            await connection.close()

    return asyncio.run(query())
