"""The outbox publisher against real PostgreSQL and a real Kafka-protocol broker: what reaches the
WAL topic, in what order, and what the outbox and the publisher's scrape show.

Each test has a database and a topic of its own: a publisher takes every row of its database.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from chatobs import Telemetry, load_settings
from chatpipe.db import connect_pool, migrate
from chatpipe.outbox.publisher import Publisher
from chatpipe.settings import load_pipeline_settings
from tests.chat_client import eventually
from tests.conftest import PORT, database_of_its_own
from tests.metrics_text import value


@pytest.fixture
def database(stack) -> Iterator[str]:
    """The URL of a fresh database on the stack's PostgreSQL server."""
    with database_of_its_own(stack["DATABASE_URL"], f"publisher_{uuid.uuid4().hex[:12]}") as url:
        yield url


@asynccontextmanager
async def publisher(telemetry: Telemetry, pool: asyncpg.Pool, bootstrap: str, **producer: object
                    ) -> AsyncIterator[Publisher]:  # fmt: skip
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **producer)
    await client.start()
    try:
        yield Publisher(telemetry, pool, client, load_pipeline_settings({}))
    finally:
        await client.stop()


async def add_row(pool: asyncpg.Pool, session: str, content: str) -> None:
    message_id = uuid.uuid4().hex
    payload = {"message_id": message_id, "session_id": session, "content": content}
    await pool.execute("insert into outbox (message_id, session_id, payload) values ($1, $2, $3)",
                       message_id, session, json.dumps(payload))  # fmt: skip


async def wal_contents(bootstrap: str, topic: str, count: int) -> list[str]:
    """The first ``count`` records' contents on ``topic``, in the order the topic holds them."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)  # fmt: skip
    await consumer.start()
    try:
        contents: list[str] = []
        while len(contents) < count:
            record = await asyncio.wait_for(consumer.getone(), 30)
            contents.append(json.loads(record.value)["content"])
        extra = await consumer.getmany(timeout_ms=1000)
        contents += [json.loads(r.value)["content"] for records in extra.values() for r in records]
        return contents
    finally:
        await consumer.stop()


def telemetry_for(topic: str) -> Telemetry:
    return Telemetry(load_settings({"CHATOBS_WAL_TOPIC": topic}), service="publisher")


def test_a_second_publisher_does_not_send_a_sessions_later_row_first(stack, database):
    """Publisher A waits for the broker on row 1 (it lingers 2 s before sending) while
    publisher B tries its round: B must send nothing until A's round is over, then row 2."""
    topic = f"chat.publisher-test.{uuid.uuid4().hex[:8]}"
    telemetry = telemetry_for(topic)
    bootstrap = stack["KAFKA_BOOTSTRAP_SERVERS"]

    async def scenario() -> list[str]:
        pool = await connect_pool(database)
        await migrate(pool)
        try:
            async with (
                publisher(telemetry, pool, bootstrap, linger_ms=2000) as slow,
                publisher(telemetry, pool, bootstrap) as quick,
            ):
                await add_row(pool, "s", "first")
                first_round = asyncio.ensure_future(slow.publish_round())
                await asyncio.sleep(0.5)  # A holds row 1, waiting for its acknowledgement
                await add_row(pool, "s", "second")
                await add_row(pool, "t", "another session's")
                assert await quick.publish_round() is False, "a round ran beside another"
                await first_round
                await quick.publish_round()  # row 2, now that row 1 is sent
            return await wal_contents(bootstrap, topic, 3)
        finally:
            await pool.close()

    try:
        contents = asyncio.run(scenario())
    finally:
        telemetry.shutdown()
    session_s = [content for content in contents if content != "another session's"]
    assert session_s == ["first", "second"], f"the WAL holds {contents}"
    assert "another session's" in contents, "another session was held up"


def test_a_row_the_broker_refuses_for_good_is_parked_and_holds_up_nothing(stack, database):
    topic = f"chat.publisher-test.{uuid.uuid4().hex[:8]}"
    telemetry = telemetry_for(topic)
    bootstrap = stack["KAFKA_BOOTSTRAP_SERVERS"]

    async def scenario() -> tuple[list[str], list[asyncpg.Record]]:
        pool = await connect_pool(database)
        await migrate(pool)
        try:
            # A producer whose records may not exceed 4 KB: the 10 KB row is refused before it is sent.
            async with publisher(telemetry, pool, bootstrap, max_request_size=4096) as refusing:
                await add_row(pool, "a", "a1")
                await add_row(pool, "b", "x" * 10_000)
                await add_row(pool, "a", "a2")
                await add_row(pool, "b", "b2")
                for _ in range(3):
                    await refusing.publish_round()
                await refusing.measure_backlog()
                rows = await pool.fetch("select payload::json->>'content' as content, sent_at, parked_at,"
                                        " parked_reason from outbox order by id")  # fmt: skip
            return await wal_contents(bootstrap, topic, 3), rows
        finally:
            await pool.close()

    try:
        contents, rows = asyncio.run(scenario())
        scrape = telemetry.scrape()[2].decode()
    finally:
        telemetry.shutdown()
    assert sorted(contents) == ["a1", "a2", "b2"], f"each small row once, and only once: {contents}"
    parked = [row for row in rows if row["parked_at"] is not None]
    assert len(parked) == 1 and parked[0]["content"].startswith("xxx") and parked[0]["sent_at"] is None
    assert "MessageSizeTooLargeError" in parked[0]["parked_reason"]
    assert all(row["sent_at"] is not None for row in rows if row["parked_at"] is None)
    assert value(scrape, "outbox_rows_parked_total") == 1
    # The parked row is not pending: the backlog gauge would hold OutboxBacklogNotDraining up for ever.
    assert "\noutbox_pending 0\n" in scrape


def test_rows_confirmed_longer_ago_than_the_retention_are_deleted_and_no_others(stack, database):
    hour = {"CHATPIPE_OUTBOX_RETENTION_SECONDS": "3600", "CHATPIPE_PUBLISHER_BATCH_SIZE": "2"}
    settings = load_pipeline_settings(hour)
    forever = load_pipeline_settings({"CHATPIPE_OUTBOX_RETENTION_SECONDS": "0"})
    telemetry = telemetry_for("chat.publisher-test.unused")
    states = {  # content: (sent, confirmed, parked), as intervals before now
        "old-1": ("3 hours", "2 hours", None), "old-2": ("3 hours", "2 hours", None),
        "old-3": ("3 hours", "90 minutes", None), "recent": ("20 minutes", "10 minutes", None),
        "never-confirmed": ("3 hours", None, None), "parked": (None, None, "3 hours"), "pending": (None, None, None),
    }  # fmt: skip

    async def scenario() -> tuple[int, int, list[str]]:
        pool = await connect_pool(database)
        await migrate(pool)
        try:
            for content, (sent, confirmed, parked) in states.items():
                await add_row(pool, "s", content)
                await pool.execute(
                    "update outbox set created_at = now() - interval '4 hours',"
                    " sent_at = now() - $2::text::interval, confirmed_at = now() - $3::text::interval,"
                    " parked_at = now() - $4::text::interval where payload->>'content' = $1",
                    content, sent, confirmed, parked,
                )  # fmt: skip
            kept_for_good = await Publisher(telemetry, pool, None, forever).sweep_round()  # type: ignore[arg-type]
            deleted = await Publisher(telemetry, pool, None, settings).sweep_round()  # type: ignore[arg-type]
            left = await pool.fetch("select payload->>'content' as content from outbox order by id")
            return kept_for_good, deleted, [row["content"] for row in left]
        finally:
            await pool.close()

    try:
        kept_for_good, deleted, left = asyncio.run(scenario())
    finally:
        telemetry.shutdown()
    assert kept_for_good == 0
    assert deleted == 3, "three rows confirmed over an hour ago, deleted in batches of two"
    assert left == ["recent", "never-confirmed", "parked", "pending"]


def test_a_publisher_started_while_the_broker_is_down_measures_the_backlog_meanwhile(database, start_service):
    """``python -m chatpipe.outbox.publisher`` waited for a broker before anything else: while it
    waited, its scrape had no ``outbox_pending`` (the backlog alert's series) and no health checks,
    exactly when the backlog grows."""

    async def pending_rows() -> None:
        pool = await connect_pool(database)
        try:
            await migrate(pool)
            for n in range(5):
                await add_row(pool, "s1", f"row {n}")
        finally:
            await pool.close()

    asyncio.run(pending_rows())
    with socket.socket() as nothing_listens:  # a port of this machine where no broker answers
        nothing_listens.bind(("127.0.0.1", 0))
        bootstrap = f"127.0.0.1:{nothing_listens.getsockname()[1]}"
    env = {"DATABASE_URL": database, "REDIS_URL": "redis://127.0.0.1:1/0", "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "CHATOBS_METRICS_PORT": PORT, "CHATOBS_METRICS_HOST": "127.0.0.1",
           "CHATPIPE_BACKLOG_POLL_SECONDS": "0.5", "CHATPIPE_HEALTH_PROBE_SECONDS": "0.5"}  # fmt: skip
    service = start_service(env, command=[sys.executable, "-m", "chatpipe.outbox.publisher"])

    def measured() -> str | None:
        # Each probe is counted as it ends: Kafka's fails at once, Postgres's comes after.
        text = httpx.get(f"{service.base_url}/metrics", timeout=5).text
        ready = ("outbox_pending " in text
                 and value(text, "health_checks_total", component="postgres", result="ok") >= 1
                 and value(text, "health_checks_total", component="kafka", result="fail") >= 1)  # fmt: skip
        return text if ready else None

    text = eventually(measured, timeout=20, what="the backlog measured, postgres checked ok and kafka failing")
    assert value(text, "outbox_pending") == 5
    assert value(text, "health_checks_total", component="kafka", result="ok") == 0
