"""Kafka clients that wait for the broker instead of failing the service at start, and the
consumers' at-least-once rule: an offset is committed only past records that were handled.

Example::

    handler = ConcurrentHandler(handle, limit=64, waiting="records wait for a backend")
    await handler.round(consumer)   # fetched records handled at once; committed in order as they finish
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from chatpipe.runtime import forever, sleep_unless_stopped

__all__ = [
    "ConcurrentHandler",
    "HandOver",
    "OnceStarted",
    "PostponedError",
    "RecordsPostponedError",
    "commit_handled",
    "new_consumer",
    "new_producer",
    "start_consumer",
    "start_producer",
    "started",
]

_logger = logging.getLogger("chatpipe")


async def started(client: AIOKafkaConsumer | AIOKafkaProducer, what: str, stopping: asyncio.Event) -> bool:
    """Start ``client``, trying again while no broker answers; False if ``stopping`` came first.

    Example::

        producer = new_producer(bootstrap)
        if not await started(producer, "producer", stopping):
            return  # asked to stop before any broker answered
    """
    delay = 0.5
    while not stopping.is_set():
        try:
            if await _unless_stopped(client.start(), stopping):
                return True
            # A stop while starting: a broker that takes connections and does not answer (or a group
            # without a coordinator) held start() for its whole request timeout, SIGTERM unheeded.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), 5)
            return False
        except Exception as error:  # noqa: BLE001 - the broker may come later
            _logger.warning("%s: broker not reachable (%s); retrying in %.1fs", what, error, delay)
            await sleep_unless_stopped(stopping, delay)
            delay = min(delay * 2, 5.0)
    return False


async def _unless_stopped(work: Awaitable[object], stopping: asyncio.Event) -> bool:
    """``work`` to its end (True; its exception raised), or cancelled once ``stopping`` is set (False)."""
    doing, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((doing, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not doing.done():
            doing.cancel()
            try:
                with contextlib.suppress(Exception):  # what a cancelled start() made of its cancellation
                    await doing
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # the caller is cancelled too: not to be swallowed here
    if doing.cancelled():
        return False
    doing.result()
    return True


def new_producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    """A producer (acks from all replicas), not started yet (:func:`started`)."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000, **options)


async def start_producer(bootstrap: str, stopping: asyncio.Event, **options: Any) -> AIOKafkaProducer | None:
    """A started producer (acks from all replicas), or None if asked to stop first."""
    producer = new_producer(bootstrap, **options)
    return producer if await started(producer, "producer", stopping) else None


def new_consumer(
    topic: str, group: str, bootstrap: str, *, listener: ConsumerRebalanceListener | None = None, **options: Any
) -> AIOKafkaConsumer:
    """A consumer of ``topic`` in ``group`` committing by hand (after the work is done), not
    started yet (:func:`started`); ``listener`` is told of rebalances (:class:`HandOver`)."""
    if isinstance(listener, HandOver):
        # The group waits this long for a member to rejoin (aiokafka's default is its 10 s session
        # timeout): the hand-over's wait and commit must fit, or the group goes on without it.
        options.setdefault("rebalance_timeout_ms", int((listener.grace + _REJOIN_MARGIN_SECONDS) * 1000))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest", **options
    )
    consumer.subscribe([topic], listener=listener)
    return consumer


async def start_consumer(
    topic: str, group: str, bootstrap: str, stopping: asyncio.Event, *,
    listener: ConsumerRebalanceListener | None = None, **options: Any,
) -> AIOKafkaConsumer | None:  # fmt: skip
    """A started consumer (:func:`new_consumer`), or None if asked to stop first."""
    consumer = new_consumer(topic, group, bootstrap, listener=listener, **options)
    return consumer if await started(consumer, f"consumer {group}", stopping) else None


class OnceStarted:
    """Kafka clients started once, for the service loops that need them, while its other loops
    (health probes, gauges) run from the first moment: a service (re)started while the broker
    is down reports that, and what it can still measure, instead of nothing until a broker answers.

    Example::

        kafka = OnceStarted(stopping, ("producer", producer), ("consumer worker", consumer))
        await run_until_stopped(stopping,
                                kafka.then(worker.consume(consumer, stopping)),
                                periodic("health", health.round, stopping, every=5), grace=10)
    """

    def __init__(self, stopping: asyncio.Event, *clients: tuple[str, AIOKafkaConsumer | AIOKafkaProducer]):
        self._stopping = stopping
        self._clients = clients
        self._lock = asyncio.Lock()
        self._started = False

    async def started(self) -> bool:
        """Every client started (the first caller starts them, in order), or False if asked to stop first."""
        async with self._lock:
            if not self._started:
                for what, client in self._clients:
                    if not await started(client, what, self._stopping):
                        return False  # asked to stop: tried again by no one, as stopping stays set
                self._started = True
            return True

    async def then(self, loop: Coroutine[Any, Any, None]) -> None:
        """``loop`` once the clients are started; dropped, never run, if the service stops first."""
        try:
            ready = await self.started()
        except BaseException:  # cancelled while starting (a stop's grace ran out): never to run
            loop.close()
            raise
        if ready:
            await loop
        else:
            loop.close()


#: Added to a hand-over's grace for the group's rebalance timeout: its commit (2 s at most) and the rejoin.
_REJOIN_MARGIN_SECONDS = 10.0


class HandOver(ConsumerRebalanceListener):
    """At a rebalance, the records in flight on the partitions this consumer gives up are let
    finish, up to ``grace`` seconds, and committed, before the partitions go to their new owner.

    Without it their handlers ran on, uncommitted, and the new owner took the same records from
    the last commit: a turn still streaming was answered twice (its ``answered:`` mark is written
    only as it ends). A record still running after ``grace`` is left to the new owner, as before.
    Created before the consumer (which takes it at ``subscribe``), then attached (:meth:`attach`) to the
    handler; a rebalance before that has nothing in flight.

    Example::

        hand_over = HandOver(grace=settings.shutdown_grace_seconds)
        consumer = await start_consumer(topic, "worker", bootstrap, stopping, listener=hand_over)
        hand_over.attach(worker.turns, consumer)
    """

    def __init__(self, grace: float):
        self.grace = grace
        self._handler: ConcurrentHandler | None = None
        self._consumer: AIOKafkaConsumer | None = None

    def attach(self, handler: ConcurrentHandler, consumer: AIOKafkaConsumer) -> None:
        self._handler, self._consumer = handler, consumer

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        if self._handler is not None and self._consumer is not None:
            await self._handler.hand_over(self._consumer, set(revoked), self.grace)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        pass


class RecordsPostponedError(RuntimeError):
    """Some records could not be handled now (a backend is down); they will be delivered again."""


class PostponedError(RuntimeError):
    """Raised by a handler that leaves its record to come again on purpose (its service is
    stopping, say): the record is rewound to like a failed one, but said at INFO, not as a failure."""


class ConcurrentHandler:
    """Records handled as they arrive, many at once, and committed in order as they finish.

    Each :meth:`round` fetches, starts a handler task per record, and commits each partition up
    to its first record still being handled: the consumer fetches again while earlier records
    are handled, so one slow record (a turn waiting on the LLM) holds up no other, and an offset
    never passes a record that has not finished. A partition with ``limit`` records unfinished
    is paused (its fetching only: the others flow, and the consumer keeps polling, so the group
    keeps it) until some finish. When a handler raises (a backend is down), the handlers in
    flight are let finish, each partition is committed up to its first failed record and
    rewound to it (:func:`commit_handled`), and :class:`RecordsPostponedError` is raised: that
    record and those after it come again. A partition no longer assigned (a rebalance) is
    forgotten: its new owner takes its records from the last commit.

    Handlers must be idempotent, and take their turn in any order of their own before they
    first await (tasks start in the order of their records).

    Example::

        handler = ConcurrentHandler(answer, limit=64, waiting="turns wait for a backend")
        await handler.consume(consumer, stopping, "consume")  # a service loop, until stopping
    """

    def __init__(self, handle: Callable[[ConsumerRecord], Awaitable[None]], *, limit: int, waiting: str):
        self._handle = handle
        self._limit = limit
        self._waiting = waiting
        # Per partition, its records not yet committed, in offset order, each with its handler task.
        self._started: dict[TopicPartition, list[tuple[ConsumerRecord, asyncio.Task[None]]]] = {}
        self._paused: set[TopicPartition] = set()

    def _running(self) -> list[asyncio.Task[None]]:
        return [task for started in self._started.values() for _, task in started if not task.done()]

    async def round(self, consumer: AIOKafkaConsumer) -> bool:
        """Fetch and start records, then commit what has finished; True if either happened.
        Raises :class:`RecordsPostponedError` once a handler has failed (see above)."""
        self._forget_unassigned(consumer)
        if self._any_failed():
            # Rewinding: fetch nothing more (it would come again anyway); commit what finished ahead
            # of the failed records as their handlers end, and rewind once none is running.
            committed = await self._commit_finished(consumer)
            if running := self._running():
                await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                return await self._commit_finished(consumer) or committed
            await self._postpone(consumer)
        self._pace(consumer)
        # Records in flight: a short fetch, so finished ones are committed soon after.
        batches = await consumer.getmany(timeout_ms=100 if self._running() else 500, max_records=self._limit)
        fetched = 0
        for partition, records in batches.items():
            started = self._started.setdefault(partition, [])
            for record in records:
                started.append((record, asyncio.create_task(self._handle(record))))
                fetched += 1
        return await self._commit_finished(consumer) or fetched > 0

    async def hand_over(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition], grace: float) -> None:
        """Let the handlers of ``partitions`` (being revoked) finish, up to ``grace`` seconds, and
        commit each of them up to its first record not finished (:class:`HandOver`)."""
        running = [task for partition in partitions for _, task in self._started.get(partition, ()) if not task.done()]
        if running:
            _logger.info("rebalance: %d record(s) in flight on %d revoked partition(s); up to %.0fs to finish",
                         len(running), len(partitions), grace)  # fmt: skip
            await asyncio.wait(running, timeout=grace)
        await self._commit_finished(consumer, partitions)

    async def drain(self, consumer: AIOKafkaConsumer) -> None:
        """Let every handler in flight finish (a stop), committing each as it does: a stop whose
        grace runs out has still committed what finished. Raises as :meth:`round` does."""
        while True:
            await self._commit_finished(consumer)
            running = self._running()
            if not running:
                if self._any_failed():
                    await self._postpone(consumer)
                return
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)

    async def consume(self, consumer: AIOKafkaConsumer, stopping: asyncio.Event, name: str) -> None:
        """Rounds until ``stopping``, then the handlers in flight finish and are committed (a
        service loop: :func:`~chatpipe.runtime.run_until_stopped` cancels it past the stop's grace,
        and what is still running then is cancelled, uncommitted, and comes again)."""
        try:
            await forever(name, lambda: self.round(consumer), stopping, idle=0.05)
            await self.drain(consumer)
        except RecordsPostponedError as postponed:
            _logger.info("%s: stopped with records to come again (%s)", name, postponed)
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        """Cancel the handlers still running (their records are not committed: they come again),
        and wait a moment for them to end (a turn gives its budget back as it ends)."""
        tasks = [task for started in self._started.values() for _, task in started]
        self._started.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for task in tasks:  # retrieved: no "exception was never retrieved" at exit
            if task.done() and not task.cancelled():
                task.exception()

    def _any_failed(self) -> bool:
        return any(task.done() and _failed(task) for started in self._started.values() for _, task in started)

    def _pace(self, consumer: AIOKafkaConsumer) -> None:
        for partition in {*self._started, *self._paused}:
            full = sum(not task.done() for _, task in self._started.get(partition, ())) >= self._limit
            if full and partition not in self._paused:
                consumer.pause(partition)
                self._paused.add(partition)
            elif not full and partition in self._paused:
                consumer.resume(partition)
                self._paused.discard(partition)

    def _forget_unassigned(self, consumer: AIOKafkaConsumer) -> None:
        assigned = consumer.assignment()
        for partition in [partition for partition in self._started if partition not in assigned]:
            # Revoked: committing it would fail the whole commit, and its new owner starts from the
            # last commit. What finished in time was committed as it went (HandOver); handlers
            # still running run on (idempotent), uncommitted.
            del self._started[partition]
        self._paused &= assigned

    async def _commit_finished(self, consumer: AIOKafkaConsumer, only: set[TopicPartition] | None = None) -> bool:
        self._forget_unassigned(consumer)
        finished: dict[TopicPartition, list[ConsumerRecord]] = {}
        for partition, started in self._started.items():
            if only is not None and partition not in only:
                continue
            count = 0  # up to the first record not finished, or failed (it is rewound to, later)
            while count < len(started) and started[count][1].done() and not _failed(started[count][1]):
                count += 1
            if count:
                finished[partition] = [record for record, _ in started[:count]]
                del started[:count]
        if finished:
            await commit_handled(consumer, finished)
        return bool(finished)

    async def _postpone(self, consumer: AIOKafkaConsumer) -> None:
        """Rewind each partition to its first failed record and raise (no handler is running)."""
        self._forget_unassigned(consumer)
        started, self._started = self._started, {}
        outcomes = [(record, task) for records in started.values() for record, task in records]
        failed = [record for record, task in outcomes if _failed(task)]
        errors = [task.exception() for _, task in outcomes if not task.cancelled() and task.exception() is not None]
        first = errors[0] if errors else "cancelled"
        # A handler that postponed its record on purpose (a stop) is no failure worth a warning.
        log = _logger.info if all(isinstance(error, PostponedError) for error in errors) else _logger.warning
        log("%d of %d %s (%r); they come again", len(failed), len(outcomes), self._waiting, first)
        batches = {partition: [record for record, _ in records] for partition, records in started.items()}
        await commit_handled(consumer, batches, failed)  # raises RecordsPostponedError if any failed here


def _failed(task: asyncio.Task[None]) -> bool:
    return task.cancelled() or task.exception() is not None


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
