"""Kafka clients that wait for the broker instead of failing the service at start."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from chatpipe.runtime import sleep_unless_stopped

__all__ = ["start_consumer", "start_producer"]

_logger = logging.getLogger("chatpipe")


async def _start(client: Any, what: str, stopping: asyncio.Event) -> bool:
    delay = 0.5
    while not stopping.is_set():
        try:
            await client.start()
            return True
        except Exception as error:  # noqa: BLE001 - the broker may come later
            _logger.warning("%s: broker not reachable (%s); retrying in %.1fs", what, error, delay)
            await sleep_unless_stopped(stopping, delay)
            delay = min(delay * 2, 5.0)
    return False


async def start_producer(bootstrap: str, stopping: asyncio.Event, **options: Any) -> AIOKafkaProducer | None:
    """A started producer (acks from all replicas), or None if asked to stop first."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000, **options)
    return producer if await _start(producer, "producer", stopping) else None


async def start_consumer(
    topic: str, group: str, bootstrap: str, stopping: asyncio.Event, **options: Any
) -> AIOKafkaConsumer | None:
    """A started consumer in ``group`` committing by hand (after the work is done)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", **options,
    )  # fmt: skip
    return consumer if await _start(consumer, f"consumer {group}", stopping) else None
