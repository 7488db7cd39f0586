"""Records handled at once and committed in order, against the session's real Kafka-protocol broker:
what the consumer group has committed is what a restarted service would start from."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from chatpipe.kafka import ConcurrentHandler, HandOver, start_consumer


async def _topic(bootstrap: str, partitions: int, records: dict[int, int]) -> str:
    """A new topic of ``partitions`` partitions holding ``records[partition]`` records each."""
    topic = f"chat.handler.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    for partition, count in records.items():
        for n in range(count):
            await _send(bootstrap, topic, partition, f"{partition}-{n}".encode())
    return topic


async def _consumer(bootstrap: str, topic: str, partitions: int) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=topic, enable_auto_commit=False,
                                auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    consumer.assign([TopicPartition(topic, partition) for partition in range(partitions)])
    return consumer


async def _rounds_until(handler: ConcurrentHandler, consumer: AIOKafkaConsumer, done: Callable[[], bool]) -> None:
    for _ in range(20):  # a round waits 0.5 s at most
        if done():
            return
        await handler.round(consumer)
    raise AssertionError("not done after 20 rounds")


async def _send(bootstrap: str, topic: str, partition: int, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, partition=partition)
    finally:
        await producer.stop()


def _handler(handle: Callable[[ConsumerRecord], Awaitable[None]], limit: int = 8) -> ConcurrentHandler:
    return ConcurrentHandler(handle, limit=limit, waiting="records wait")


def test_a_stop_cut_short_has_committed_what_finished(stack):
    """One record done at once, the next slow: a drain the stop's grace cuts short has committed
    the first (the slow one comes again), rather than nothing."""
    bootstrap = stack["KAFKA_BOOTSTRAP_SERVERS"]

    async def scenario() -> int | None:
        topic = await _topic(bootstrap, 1, {0: 2})
        consumer = await _consumer(bootstrap, topic, 1)
        handled: list[bytes] = []

        async def handle(record: ConsumerRecord) -> None:
            if record.offset == 1:
                await asyncio.sleep(30)
            handled.append(record.value)

        handler = _handler(handle)
        try:
            while not await handler.round(consumer):  # until both are fetched (and started, not run yet)
                pass
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(handler.drain(consumer), 5.0)  # the grace runs out on the slow one
            await handler.cancel()
            return await consumer.committed(TopicPartition(topic, 0))
        finally:
            await consumer.stop()

    assert asyncio.run(scenario()) == 1


def test_a_partition_full_of_slow_records_holds_up_no_other_partition(stack):
    """Partition 0's records all wait; with as many in flight as the limit, partition 0 is paused,
    and a record arriving then on partition 1 is still fetched and handled."""
    bootstrap = stack["KAFKA_BOOTSTRAP_SERVERS"]

    async def scenario() -> tuple[list[bytes], int | None]:
        topic = await _topic(bootstrap, 2, {0: 6})
        consumer = await _consumer(bootstrap, topic, 2)
        release = asyncio.Event()
        waiting: list[bytes] = []
        handled: list[bytes] = []

        async def handle(record: ConsumerRecord) -> None:
            if record.partition == 0:
                waiting.append(record.value)
                await release.wait()
            handled.append(record.value)

        handler = _handler(handle, limit=2)
        try:
            await _rounds_until(handler, consumer, lambda: len(waiting) >= 2)
            await _send(bootstrap, topic, 1, b"1-0")
            await _rounds_until(handler, consumer, lambda: b"1-0" in handled)
            release.set()
            await _rounds_until(handler, consumer, lambda: len(handled) == 7)
            await handler.drain(consumer)
            return handled, await consumer.committed(TopicPartition(topic, 0))
        finally:
            await handler.cancel()
            await consumer.stop()

    handled, committed = asyncio.run(scenario())
    assert handled[0] == b"1-0", handled
    assert sorted(handled[1:]) == [f"0-{n}".encode() for n in range(6)]
    assert committed == 6


def test_records_finished_ahead_of_a_failed_one_are_committed_while_others_still_run(stack):
    """A record handled, the next failing (it comes again), a third still running: the first is
    committed at once, not only once the slow one is done (a stop's grace may end before)."""
    bootstrap = stack["KAFKA_BOOTSTRAP_SERVERS"]

    async def scenario() -> int | None:
        topic = await _topic(bootstrap, 1, {0: 3})
        consumer = await _consumer(bootstrap, topic, 1)

        async def handle(record: ConsumerRecord) -> None:
            if record.offset == 1:
                raise ConnectionError("a backend is down")
            if record.offset == 2:
                await asyncio.sleep(30)

        handler = _handler(handle)
        try:
            while not await handler.round(consumer):  # until all three are fetched
                pass
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(handler.drain(consumer), 5.0)
            return await consumer.committed(TopicPartition(topic, 0))
        finally:
            await handler.cancel()
            await consumer.stop()

    assert asyncio.run(scenario()) == 1


def test_a_rebalance_lets_records_in_flight_finish_and_commits_them_before_handing_over(stack):
    """A second member joins the group while the first handles two slow records (one per
    partition): the first lets them finish and commits them before it gives a partition up, so
    the second starts past them. Without the hand-over, the second handled the record again
    (a turn answered twice)."""
    bootstrap = stack["KAFKA_BOOTSTRAP_SERVERS"]

    async def scenario() -> list[tuple[str, bytes]]:
        topic = await _topic(bootstrap, 2, {0: 1, 1: 1})
        handled: list[tuple[str, bytes]] = []
        started = asyncio.Event()

        def handling(member: str, seconds: float) -> Callable[[ConsumerRecord], Awaitable[None]]:
            async def handle(record: ConsumerRecord) -> None:
                started.set()
                await asyncio.sleep(seconds)
                handled.append((member, record.value))

            return handle

        members = []
        for member, seconds in (("first", 6.0), ("second", 0.0)):
            hand_over = HandOver(grace=15)
            consumer = await start_consumer(topic, topic, bootstrap, asyncio.Event(), listener=hand_over)
            assert consumer is not None
            handler = _handler(handling(member, seconds))
            hand_over.attach(handler, consumer)
            stopping = asyncio.Event()
            consuming = asyncio.create_task(handler.consume(consumer, stopping, member))
            members.append((consumer, stopping, consuming))
            if member == "first":
                await asyncio.wait_for(started.wait(), 30)  # both partitions its, their records in flight
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while asyncio.get_running_loop().time() < deadline and not all(c.assignment() for c, _, _ in members):
                await asyncio.sleep(0.2)
            assert all(consumer.assignment() for consumer, _, _ in members), "the second member got no partition"
            await asyncio.sleep(3)  # time enough for the second member to handle anything it was handed again
            return handled
        finally:
            for consumer, stopping, task in members:
                stopping.set()
                await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 15)
                await consumer.stop()

    handled = asyncio.run(scenario())
    assert sorted(value for _, value in handled) == [b"0-0", b"1-0"], f"each record handled once: {handled}"
    assert {member for member, _ in handled} == {"first"}
