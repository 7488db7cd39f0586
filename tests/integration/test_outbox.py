"""The outbox under a broker outage: nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from chatpipe.launcher import Pipeline
from tests.chat_client import ChatClient, eventually
from tests.metrics_text import value


def replicated_ids(database_url: str) -> list[str]:
    async def fetch() -> list[str]:
        connection = await asyncpg.connect(database_url)
        try:
            return [row["message_id"] for row in await connection.fetch("select message_id from replicated_messages")]
        finally:
            await connection.close()

    return asyncio.run(fetch())


@pytest.mark.slow
def test_outbox_holds_messages_through_a_broker_outage(own_stack, tmp_path):
    local = own_stack()
    env = {"CHATPIPE_BACKLOG_POLL_SECONDS": "0.3"}
    with Pipeline(local.environment, tmp_path, env=env) as pipeline:
        chat = ChatClient(pipeline.gateway_url)
        session = chat.new_session()
        publisher = pipeline.metrics_urls["publisher"]

        def post(count: int) -> list[str]:
            return [chat.http.post(f"/v1/sessions/{session}/messages", json={"content": f"message {n}"})
                    .json()["message_id"] for n in range(count)]  # fmt: skip

        database = local.environment["DATABASE_URL"]
        first = post(5)
        eventually(lambda: set(replicated_ids(database)) >= set(first), what="first batch replicated")

        local.stop_server("kafka")
        second = post(5)  # accepted (202) while the broker is down: they wait in the outbox
        eventually(lambda: value(httpx.get(publisher).text, "outbox_pending") >= 5, what="outbox_pending grows")

        local.start_server("kafka")
        eventually(lambda: value(httpx.get(publisher).text, "outbox_pending") == 0, timeout=60, what="outbox drained")
        everything = set(first + second)
        eventually(lambda: set(replicated_ids(database)) == everything, timeout=60, what="all replicated")
        stored = replicated_ids(database)
        assert len(stored) == len(set(stored)) == 10, "no message lost, none duplicated"


@pytest.mark.slow
def test_the_publisher_is_told_of_new_rows_instead_of_polling(stack, tmp_path):
    # With a minute between rounds, only the outbox's notification can make the publisher
    # send a message within seconds; and an idle publisher runs no statement at all.
    env = {"CHATPIPE_PUBLISHER_IDLE_SECONDS": "60", "CHATPIPE_BACKLOG_POLL_SECONDS": "60",
           "CHATPIPE_OUTBOX_REDELIVER_SECONDS": "300",
           # Its Postgres health probe (`select 1`, every 15 s by default) is a statement too:
           # the test's quiet window met one whenever the start was slow.
           "CHATPIPE_HEALTH_PROBE_SECONDS": "3600"}  # fmt: skip
    with Pipeline(stack, tmp_path, env=env) as pipeline:
        chat = ChatClient(pipeline.gateway_url)
        session = chat.new_session()
        publisher = pipeline.metrics_urls["publisher"]
        database = stack["DATABASE_URL"]
        for n in range(3):
            sent = chat.http.post(f"/v1/sessions/{session}/messages", json={"content": f"told {n}"})
            message_id = sent.json()["message_id"]
            eventually(lambda message_id=message_id: message_id in replicated_ids(database), timeout=10,
                       what=f"message {n} replicated")  # fmt: skip

        def statements() -> float:
            return value(httpx.get(publisher).text, "postgres_operation_seconds_count")

        idle = statements()
        asyncio.run(asyncio.sleep(3))
        assert statements() == idle, "an idle publisher polled the outbox"
