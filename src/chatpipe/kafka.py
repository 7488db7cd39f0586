"""Kafka clients that wait for the broker instead of failing the service at start, and the
consumers' at-least-once rule: an offset is committed only past records that were handled.

Example::

    batches = await consumer.getmany(timeout_ms=500)
    await handle_together(consumer, batches, handle, "records wait for a backend")  # failed ones come again
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from chatpipe.runtime import sleep_unless_stopped

__all__ = ["RecordsPostponedError", "commit_handled", "handle_together", "start_consumer", "start_producer"]

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


class RecordsPostponedError(RuntimeError):
    """Some records could not be handled now (a backend is down); they will be delivered again."""


async def handle_together(
    consumer: AIOKafkaConsumer,
    batches: Mapping[TopicPartition, Sequence[ConsumerRecord]],
    handle: Callable[[ConsumerRecord], Awaitable[None]],
    waiting: str,
) -> bool:
    """``handle`` every record of ``batches`` at once, then commit what was handled (see
    :func:`commit_handled`): a record whose handler raised, and those after it in its partition,
    come again. ``waiting`` says in the log what such records wait for. False if there were none.

    Example::

        batches = await consumer.getmany(timeout_ms=500)
        await handle_together(consumer, batches, answer, "turns wait for a backend")
    """
    records = [record for batch in batches.values() for record in batch]
    if not records:
        return False
    outcomes = await asyncio.gather(*(handle(record) for record in records), return_exceptions=True)
    failed = [record for record, outcome in zip(records, outcomes, strict=True) if isinstance(outcome, BaseException)]
    if failed:
        first = next(outcome for outcome in outcomes if isinstance(outcome, BaseException))
        _logger.warning("%d of %d %s (%r); they come again", len(failed), len(records), waiting, first)
    await commit_handled(consumer, batches, failed)  # raises RecordsPostponedError if any failed
    return True


async def commit_handled(
    consumer: AIOKafkaConsumer,
    batches: Mapping[TopicPartition, Sequence[ConsumerRecord]],
    failed: Iterable[ConsumerRecord] = (),
    *,
    commit_timeout: float = 2.0,
) -> None:
    """Commit each partition of ``batches`` up to its first ``failed`` record and rewind the consumer
    there, so that record and the ones after it are delivered again (handlers are idempotent).
    If any failed, raise :class:`RecordsPostponedError` once that is done (for the caller's backoff).

    Without the rewind, a failed record would be skipped: the consumer's position is already
    past it, and the next round's commit would commit past it for good.

    A commit that fails or takes longer than ``commit_timeout`` is logged and left to the next
    round's commit, which covers it: the records were handled, and at worst a restart delivers
    them again. aiokafka retries a commit the broker refuses with a retriable error for ever
    (a broker that lost its log refuses them for good: Tansu's in-memory storage after a
    restart), and a consumer waiting on it would never handle another record.
    """
    retry_from: dict[TopicPartition, int] = {}
    for record in failed:
        partition = TopicPartition(record.topic, record.partition)
        retry_from[partition] = min(retry_from.get(partition, record.offset), record.offset)
    for partition, offset in retry_from.items():
        # Revoked meanwhile (a rebalance): its new owner starts from the committed offset anyway.
        with contextlib.suppress(IllegalStateError):
            consumer.seek(partition, offset)
    offsets = {
        partition: retry_from.get(partition, records[-1].offset + 1)
        for partition, records in batches.items()
        if records
    }
    if offsets:
        try:
            await asyncio.wait_for(consumer.commit(offsets), commit_timeout)
        except (KafkaError, TimeoutError) as error:
            _logger.warning("commit of %s failed (%r); the next commit covers it", _describe(offsets), error)
    if retry_from:
        raise RecordsPostponedError(f"records of {len(retry_from)} partition(s) postponed; they come again")


def _describe(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{partition.topic}[{partition.partition}]@{offset}" for partition, offset in offsets.items())
