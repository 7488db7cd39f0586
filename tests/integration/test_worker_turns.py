"""The worker's turns, run in this process against the session's real Redis and Kafka-protocol
broker, with the LLM and Somabrain simulators as servers: WAL records in, the chat events the
gateway would relay out, and the worker's scraped metrics.

In this process nothing runs but what the test starts (no replay round, no other worker), so a
batch of turns arrives in one consume round, and a breaker's half-open trial is the turn the
test sends, exactly when the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from redis.asyncio.client import PubSub

from chatobs import Telemetry, load_settings
from chatpipe.events import events_channel, tool_abandoned_key
from chatpipe.kafka import start_producer
from chatpipe.settings import load_pipeline_settings
from chatpipe.worker.service import DEGRADED_PREFIX, Worker
from tests.metrics_text import value

BREAKER_RESET_SECONDS = 0.5
#: The Redis database these workers keep their data in: not the session pipeline's (0), whose
#: worker replays and counts every `degraded:*` key of its own database while these tests run.
PRIVATE_DATABASE = 7


def private_database(url: str) -> str:
    """``url`` (``redis://host:port/0``) with :data:`PRIVATE_DATABASE` as its database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{PRIVATE_DATABASE}"))


@dataclass
class Simulators:
    llm: str
    somabrain: str


@pytest.fixture
def simulators(start_service) -> Simulators:
    """An LLM and a Somabrain simulator of this test's own (their faults are the test's)."""
    llm = start_service({}, app="chatpipe.sim.llm:app", ready_path="/health")
    somabrain = start_service({}, app="chatpipe.sim.somabrain:app", ready_path="/health")
    return Simulators(llm.base_url, somabrain.base_url)


@dataclass
class Turns:
    """A worker fed by a WAL topic of its own; each :meth:`send` is a batch of user messages."""

    worker: Worker
    telemetry: Telemetry
    redis: aioredis.Redis
    http: httpx.AsyncClient
    producer: AIOKafkaProducer
    bootstrap: str
    topic: str = field(default_factory=lambda: f"chat.wal.turns.{uuid.uuid4().hex[:8]}")
    consumer: AIOKafkaConsumer | None = None
    sent: list[str] = field(default_factory=list)
    #: Every chat event of the last :meth:`send`, as it arrived: (session id, event).
    stream: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Held by the send that runs the worker's rounds (sends may overlap; one consumer, one round at a time).
    pumping: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(
        self,
        *contents: str,
        tenant: str = "acme",
        one_session: bool = False,
        ages: tuple[float, ...] = (),
        finals_expected: int | None = None,
    ) -> list[dict[str, Any]]:
        """Each of ``contents`` as a user message of a session of its own (or all of one session),
        all in one record batch (so one consume round takes them together); the final event
        (message or error) of each, in the order sent (for one session: in the order they came).
        ``ages``: how long ago each was accepted (0 by default); ``finals_expected``: how many final
        events to wait for (for one session: all of them by default)."""
        shared = uuid.uuid4().hex
        events = [
            {"message_id": uuid.uuid4().hex, "session_id": shared if one_session else uuid.uuid4().hex,
             "tenant": tenant, "role": "user", "content": content, "source": "api",
             "accepted_at": time.time() - (ages[n] if n < len(ages) else 0)}
            for n, content in enumerate(contents)
        ]  # fmt: skip
        self.sent += [event["message_id"] for event in events]
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(*{events_channel(event["session_id"]) for event in events})
        batch = self.producer.create_batch()
        for event in events:
            batch.append(key=event["session_id"].encode(), value=json.dumps(event).encode(), timestamp=None)
        await (await self.producer.send_batch(batch, self.topic, partition=0))
        if self.consumer is None:
            # Assigned its partition rather than subscribed: no group to join (seconds), commits all the same.
            self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.topic,
                                             enable_auto_commit=False, auto_offset_reset="earliest")  # fmt: skip
            await self.consumer.start()
            self.consumer.assign([TopicPartition(self.topic, 0)])
        self.stream = []
        finals: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + 60
        try:
            while len(finals) < (len(events) if finals_expected is None else finals_expected):
                assert time.monotonic() < deadline, f"{len(finals)} of {len(events)} turns answered"
                if not self.pumping.locked():  # else another send runs the rounds meanwhile
                    async with self.pumping:
                        await self.worker.consume_round(self.consumer)
                else:
                    await asyncio.sleep(0.01)
                while message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05):
                    arrived = (message["channel"].decode().rsplit(":", 1)[1], json.loads(message["data"]))
                    self.stream.append(arrived)
                    if arrived[1]["type"] in ("message", "error"):
                        finals.append(arrived)
        finally:
            await pubsub.aclose()
        if one_session:
            return [event for _, event in finals]
        by_session = dict(finals)
        return [by_session[event["session_id"]] for event in events]

    async def control(self, url: str, **faults: object) -> None:
        (await self.http.post(f"{url}/control", json=faults, timeout=5)).raise_for_status()

    def metrics(self) -> str:
        return self.telemetry.scrape()[2].decode()


@contextlib.asynccontextmanager
async def running_worker(stack: dict[str, str], simulators: Simulators, *, instrument: bool = False,
                         **env: str) -> AsyncIterator[Turns]:  # fmt: skip
    """A worker in this process; ``instrument``: its Redis, HTTP and Kafka clients measured too."""
    settings = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": f"{simulators.llm}/v1",
                                       "CHATPIPE_SOMABRAIN_URL": simulators.somabrain, **env})  # fmt: skip
    telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="worker")
    if instrument:
        assert "redis" in telemetry.instrument()  # undone by telemetry.shutdown()
    redis = aioredis.Redis.from_url(private_database(stack["REDIS_URL"]))
    producer = await start_producer(stack["KAFKA_BOOTSTRAP_SERVERS"], asyncio.Event())
    assert producer is not None
    turns = None
    try:
        async with httpx.AsyncClient() as http:
            worker = Worker(telemetry, settings, redis, http, producer)
            turns = Turns(worker, telemetry, redis, http, producer, stack["KAFKA_BOOTSTRAP_SERVERS"])
            yield turns
    finally:
        if turns is not None:
            if turns.consumer is not None:
                with contextlib.suppress(Exception):  # turns still in flight finish first (and are committed)
                    await turns.worker.drain(turns.consumer)
                await turns.consumer.stop()
            # Memory writes buffered in degraded mode: no replay round here will ever take them.
            await redis.delete(*(f"{DEGRADED_PREFIX}{message_id}" for message_id in turns.sent or ["none"]))
        await producer.stop()
        await redis.aclose()
        telemetry.shutdown()


def test_turns_admitted_together_stay_within_the_message_budget(stack, simulators):
    """Ten turns in one consume round run at once; a budget of three messages answers three."""
    tenant = f"trio{uuid.uuid4().hex[:6]}"

    async def scenario() -> tuple[list[dict[str, Any]], str]:
        async with running_worker(stack, simulators, CHATPIPE_TENANT_MESSAGE_BUDGETS=f"{tenant}=3") as turns:
            finals = await turns.send(*(f"concurrent turn {n}" for n in range(10)), tenant=tenant)
            return finals, turns.metrics()

    finals, text = asyncio.run(scenario())
    answered = [event for event in finals if event["type"] == "message"]
    refused = [event for event in finals if event.get("reason") == "budget"]
    assert (len(answered), len(refused)) == (3, 7), finals
    refusal = f"Message budget exceeded for tenant {tenant}: 3 of 3 messages used in this 3600s window."
    assert {event["error"] for event in refused} == {refusal}
    assert value(text, "tenant_budget_messages_used", tenant=tenant) == 3
    assert value(text, "tenant_budget_messages_allowed", tenant=tenant) == 3
    assert value(text, "tenant_budget_messages_overruns_total", tenant=tenant) == 7


def test_a_quiet_tenants_usage_gauges_follow_the_budget_window(stack, simulators):
    """Used 1 of its messages, then quiet: once the window changes, its gauges show the new one's 0."""
    tenant = f"quiet{uuid.uuid4().hex[:6]}"

    async def scenario() -> tuple[str, str]:
        window = 4
        async with running_worker(stack, simulators, CHATPIPE_BUDGET_WINDOW_SECONDS=str(window)) as turns:
            await asyncio.sleep(window - time.time() % window + 0.05)  # a window just begun: the turn fits in it
            (final,) = await turns.send("one message", tenant=tenant)
            assert final["type"] == "message", final
            await turns.worker.measure_budget_usage()
            during = turns.metrics()
            await asyncio.sleep(window - time.time() % window + 0.05)  # the next window: nothing counted yet
            await turns.worker.measure_budget_usage()
            return during, turns.metrics()

    during, after = asyncio.run(scenario())
    assert value(during, "tenant_budget_messages_used", tenant=tenant) == 1
    assert value(during, "tenant_budget_tokens_used", tenant=tenant) > 0
    assert value(after, "tenant_budget_messages_used", tenant=tenant) == 0, "the last window's usage stayed"
    assert value(after, "tenant_budget_tokens_used", tenant=tenant) == 0


def test_a_turn_that_is_not_answered_gives_its_message_back(stack, simulators):
    """Messages count from admission; one whose turn failed is not a message answered."""
    tenant = f"duo{uuid.uuid4().hex[:6]}"

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        async with running_worker(stack, simulators, CHATPIPE_TENANT_MESSAGE_BUDGETS=f"{tenant}=2") as turns:
            await turns.control(simulators.llm, outage=True)
            failed = await turns.send("first, the LLM is down", "second, the LLM is down", tenant=tenant)
            await turns.control(simulators.llm, outage=False)
            later = await turns.send("one", "two", "three", tenant=tenant)
            return failed, later, turns.metrics()

    failed, later, text = asyncio.run(scenario())
    assert [event["error"] for event in failed] == ["the language model failed (http_5xx)"] * 2
    assert sorted(event["type"] for event in later) == ["error", "message", "message"], later
    assert value(text, "tenant_budget_messages_used", tenant=tenant) == 2
    assert value(text, "tenant_budget_messages_overruns_total", tenant=tenant) == 1


def test_the_tokens_of_a_turns_first_llm_call_are_charged_when_its_call_after_the_tool_fails(stack, simulators):
    """A turn that calls a tool makes two LLM calls; the first one's tokens were added up and lost
    when the second failed: the provider billed them, ``llm_tokens_total`` counted them, and the
    tenant's budget did not (``tenant_budget_tokens_used`` stayed 0)."""
    tenant = f"tool{uuid.uuid4().hex[:6]}"
    tool_topic = f"chat.tools.turns.{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[dict[str, Any], str]:
        async with running_worker(stack, simulators, CHATPIPE_TOOL_TOPIC=tool_topic,
                                  CHATPIPE_TOOL_TIMEOUT_SECONDS="1") as turns:  # fmt: skip
            tool_requests = AIOKafkaConsumer(tool_topic, bootstrap_servers=turns.bootstrap,
                                             auto_offset_reset="earliest")  # fmt: skip
            await tool_requests.start()

            async def llm_down_once_the_tool_is_asked_for() -> str:
                request = await tool_requests.getone()  # the first call answered with a tool call: it is over
                await turns.control(simulators.llm, outage=True)
                return json.loads(request.value)["call_id"]

            try:
                outage = asyncio.create_task(llm_down_once_the_tool_is_asked_for())
                (final,) = await turns.send("what time is it?", tenant=tenant)  # no executor: the tool times out
                call_id = await outage
            finally:
                await tool_requests.stop()
            # Given up on, the call is marked so: an executor behind (an outage) does not run it.
            assert await turns.redis.exists(tool_abandoned_key(call_id)), "the abandoned call was not marked"
            return final, turns.metrics()

    final, text = asyncio.run(scenario())
    assert final == {"type": "error", "error": "the language model failed (http_5xx)"}, final
    assert value(text, "llm_tokens_total") > 0
    assert value(text, "tenant_budget_tokens_used", tenant=tenant) == value(text, "llm_tokens_total")


def test_a_malformed_answer_to_the_half_open_trial_reopens_the_circuit_and_it_closes_again(stack, simulators):
    """Somabrain answering the trial recall with a bare list (not ``{"memories": [...]}``) fails
    the trial: the turn goes on degraded, and once Somabrain answers properly the circuit closes."""
    breaker = {"CHATPIPE_SOMABRAIN_TIMEOUT_SECONDS": "0.3", "CHATPIPE_BREAKER_FAILURE_THRESHOLD": "2",
               "CHATPIPE_BREAKER_RESET_SECONDS": str(BREAKER_RESET_SECONDS)}  # fmt: skip
    somabrain = simulators.somabrain

    def circuit(text: str) -> float:
        return value(text, "circuit_state", component="somabrain")

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with running_worker(stack, simulators, **breaker) as turns:
            await turns.control(somabrain, outage=True)
            seen["down"] = await turns.send("first while down") + await turns.send("second while down")
            seen["opened"] = circuit(turns.metrics())
            await turns.control(somabrain, outage=False, malformed=True)
            await asyncio.sleep(BREAKER_RESET_SECONDS + 0.1)  # half-open: the next recall is the trial
            seen["trial"] = await turns.send("the trial meets a malformed answer")
            seen["reopened"] = circuit(turns.metrics())
            await turns.control(somabrain, malformed=False)
            await asyncio.sleep(BREAKER_RESET_SECONDS + 0.1)
            seen["recovered"] = await turns.send("Somabrain is fine again")
            seen["text"] = turns.metrics()
        return seen

    seen = asyncio.run(scenario())
    assert [(event["type"], event.get("mode")) for event in seen["down"]] == [("message", "degraded")] * 2
    assert seen["opened"] == 2
    assert [(event["type"], event.get("mode")) for event in seen["trial"]] == [("message", "degraded")]
    assert seen["reopened"] == 2, "the failed trial opened the circuit again"
    assert [(event["type"], event.get("mode")) for event in seen["recovered"]] == [("message", "normal")]
    assert circuit(seen["text"]) == 0
    assert value(seen["text"], "somabrain_calls_total", result="error") == 3  # two refused, one malformed
    assert value(seen["text"], "somabrain_bypass_total") == 3


def test_the_turns_of_one_session_are_answered_one_after_another_in_order(stack, simulators):
    """Three messages of one session in one batch: each reply streams whole, before the next
    begins, in the order sent (answered at once, their tokens went into one reply, interleaved)."""

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        async with running_worker(stack, simulators) as turns:
            finals = await turns.send("first question", "second question", "third question", one_session=True)
            return finals, [event for _, event in turns.stream], turns.sent[-3:]

    finals, stream, sent = asyncio.run(scenario())
    assert [event.get("reply_to") for event in finals] == sent, "not answered in the order sent"
    tokens = [event for event in stream if event["type"] == "token"]
    assert tokens and all(event.get("reply_to") in sent for event in tokens), "a token says which message it answers"
    # Each reply's events are one run: its tokens, then its message; then the next reply's.
    runs = [event["reply_to"] for event in stream if event["type"] in ("token", "message")]
    collapsed = [reply for n, reply in enumerate(runs) if n == 0 or runs[n - 1] != reply]
    assert collapsed == sent, f"replies interleaved: {collapsed}"


def test_a_slow_turn_holds_up_no_other_sessions_turn(stack, simulators):
    """A turn waiting on a tool nobody runs here (for the tool timeout), then, a second later, a
    message of another session: that one is answered at once, not after the slow turn's wait."""
    tool_wait = 4.0

    async def scenario() -> dict[str, float]:
        async with running_worker(stack, simulators, CHATPIPE_TOOL_TIMEOUT_SECONDS=str(tool_wait)) as turns:
            slow = asyncio.create_task(turns.send("what time is it?"))  # a clock call: no executor here
            await asyncio.sleep(1.0)
            started = time.monotonic()
            (quick,) = await turns.send("hello there")
            answered = {"quick": time.monotonic() - started}
            await slow
            answered["slow"] = time.monotonic() - started
            assert quick["type"] == "message", quick
            return answered

    answered = asyncio.run(scenario())
    assert answered["slow"] >= tool_wait - 1.5, answered
    assert answered["quick"] < tool_wait / 2, f"the quick turn waited behind the slow one: {answered}"


def test_the_degraded_buffer_is_counted_and_a_walk_out_of_time_is_no_redis_error(stack, simulators):
    """The gauge counts the ``degraded:*`` keys among many others; a keyspace too large to walk
    within the time limit leaves the measurement undone, without a Redis command cancelled (which
    ``redis_errors_total`` would count, as a failure of Redis's)."""
    run = uuid.uuid4().hex[:8]
    fillers = [f"test-filler:{run}:{n}" for n in range(30_000)]
    degraded = [f"{DEGRADED_PREFIX}{run}:{n}" for n in range(3)]

    async def scenario() -> tuple[float, float, str]:
        redis = aioredis.Redis.from_url(private_database(stack["REDIS_URL"]))
        try:
            async with running_worker(stack, simulators) as turns:
                await turns.worker.measure_degraded_buffer()
                before = value(turns.metrics(), "degraded_buffer_size")
                async with redis.pipeline(transaction=False) as pipe:
                    for key in [*fillers, *degraded]:
                        pipe.set(key, "{}", ex=300)
                    await pipe.execute()
                await turns.worker.measure_degraded_buffer()
                after = value(turns.metrics(), "degraded_buffer_size")
            tiny_limit = {"CHATPIPE_BACKLOG_QUERY_TIMEOUT_SECONDS": "0.0001"}
            async with running_worker(stack, simulators, instrument=True, **tiny_limit) as turns:
                with pytest.raises(TimeoutError):
                    await turns.worker.measure_degraded_buffer()
                return before, after, turns.metrics()
        finally:
            await redis.delete(*fillers, *degraded)
            await redis.aclose()

    before, after, text = asyncio.run(scenario())
    assert after - before == 3
    assert value(text, "redis_errors_total", operation="scan") == 0
    assert value(text, "redis_operation_seconds_count", operation="scan") >= 1


def test_a_buffered_memory_somabrain_refuses_is_dropped_and_opens_no_circuit(stack, simulators):
    """A buffered write Somabrain answers 422 for (it lacks its text) would be refused each time:
    the replay drops it, counts the refused call, and leaves the circuit closed; a good one
    buffered beside it is replayed."""
    run = uuid.uuid4().hex[:8]
    good = {"id": f"good-{run}", "tenant": "acme", "session_id": f"s-{run}", "text": "user: hi | assistant: hello"}
    bad = {"id": f"bad-{run}", "tenant": "acme", "session_id": f"s-{run}"}
    breaker = {"CHATPIPE_BREAKER_FAILURE_THRESHOLD": "2"}

    async def scenario() -> tuple[str, list[str], dict[str, Any]]:
        async with running_worker(stack, simulators, **breaker) as turns:
            for memory in (bad, good):
                await turns.redis.set(f"{DEGRADED_PREFIX}{memory['id']}", json.dumps(memory))
            for _ in range(3):
                await turns.worker.replay_round()
            left = [key.decode() for key in await turns.redis.keys(f"{DEGRADED_PREFIX}*-{run}")]
            stored = (
                await turns.http.get(f"{simulators.somabrain}/memories", params={"session_id": good["session_id"]})
            ).json()
            return turns.metrics(), left, stored

    text, left, stored = asyncio.run(scenario())
    assert left == [], f"still buffered: {left}"
    assert [memory["id"] for memory in stored["memories"]] == [good["id"]]
    assert value(text, "circuit_state", component="somabrain") == 0, "a refused write opened the circuit"
    assert value(text, "somabrain_calls_total", result="error") == 1
    assert value(text, "somabrain_calls_total", result="success") == 1


def test_a_message_older_than_the_answered_marks_is_not_answered(stack, simulators):
    """Past ``CHATPIPE_ANSWERED_TTL_SECONDS`` a message's mark may have expired: answering it could
    answer it twice, long after (a WAL read again from its start). The fresh one is answered."""

    async def scenario() -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]], list[str]]:
        async with running_worker(stack, simulators, CHATPIPE_ANSWERED_TTL_SECONDS="60") as turns:
            finals = await turns.send("from long ago", "just now", one_session=True, ages=(120, 0), finals_expected=1)
            await asyncio.sleep(0.5)  # anything the old one would have said by now
            return finals, turns.stream, turns.sent[-2:]

    finals, stream, (old, fresh) = asyncio.run(scenario())
    assert [(event["type"], event.get("reply_to")) for event in finals] == [("message", fresh)]
    assert not any(event.get("reply_to") == old for _, event in stream)


@contextlib.asynccontextmanager
async def consumed_as_in_service(
    turns: Turns, content: str
) -> AsyncIterator[tuple[PubSub, asyncio.Event, asyncio.Task[None]]]:
    """``content`` as one user message, consumed by the worker's own loop (``Worker.consume``, as in
    the service, stop and grace included): the session's event subscription, the stop to set, the loop."""
    event = {"message_id": uuid.uuid4().hex, "session_id": uuid.uuid4().hex, "tenant": "acme", "role": "user",
             "content": content, "source": "api", "accepted_at": time.time()}  # fmt: skip
    turns.sent.append(event["message_id"])
    pubsub = turns.redis.pubsub()
    await pubsub.subscribe(events_channel(event["session_id"]))
    await turns.producer.send_and_wait(turns.topic, json.dumps(event).encode(), partition=0)
    consumer = AIOKafkaConsumer(bootstrap_servers=turns.bootstrap, group_id=turns.topic,
                                enable_auto_commit=False, auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    consumer.assign([TopicPartition(turns.topic, 0)])
    stopping = asyncio.Event()
    consuming = asyncio.create_task(turns.worker.consume(consumer, stopping))
    try:
        yield pubsub, stopping, consuming
    finally:
        consuming.cancel()
        await asyncio.gather(consuming, return_exceptions=True)
        await pubsub.aclose()
        await consumer.stop()


def test_a_turn_cut_off_by_a_stop_tells_the_client_its_answer_comes_again(stack, simulators):
    """A stop whose grace runs out cancels a turn mid-way through its reply (a slow LLM): the client
    hears it was interrupted, so the next instance's reply is not appended to the half it has."""

    async def scenario() -> tuple[list[dict[str, Any]], str]:
        async with running_worker(stack, simulators) as turns:
            await turns.control(simulators.llm, latency_seconds=20)  # the reply streams over 20 s
            async with consumed_as_in_service(turns, "tell me a long story") as (pubsub, stopping, consuming):
                seen: list[dict[str, Any]] = []
                deadline = time.monotonic() + 30
                while not any(event["type"] == "token" for event in seen):  # the reply is streaming
                    assert time.monotonic() < deadline, seen
                    if message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1):
                        seen.append(json.loads(message["data"]))
                stopping.set()
                await asyncio.sleep(0.5)  # the grace
                consuming.cancel()
                await asyncio.gather(consuming, return_exceptions=True)
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline and seen[-1]["type"] == "token":
                    if message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2):
                        seen.append(json.loads(message["data"]))
            return seen, turns.metrics()

    seen, text = asyncio.run(scenario())
    assert seen[-1]["type"] == "error" and seen[-1].get("reason") == "interrupted", seen
    assert value(text, "wal_consume_seconds_count") == 0, "a record that comes again was counted as done with"


def test_a_stop_after_the_reply_went_out_marks_it_answered_and_says_nothing_more(stack, simulators):
    """Cancelled while remembering the turn (the reply already delivered whole): the turn is marked
    answered, so the next instance does not answer it again, and no interrupted notice follows.
    Its memory, cut off on its way to Somabrain, is kept for the replay: it was lost for good."""

    async def scenario() -> tuple[list[dict[str, Any]], bool, bool]:
        slow_memory = {"CHATPIPE_SOMABRAIN_TIMEOUT_SECONDS": "5"}
        async with running_worker(stack, simulators, **slow_memory) as turns:
            await turns.control(simulators.somabrain, latency_seconds=1.5)  # recall, then remember: 1.5 s each
            async with consumed_as_in_service(turns, "hello") as (pubsub, _, consuming):
                seen: list[dict[str, Any]] = []
                deadline = time.monotonic() + 30
                while not any(event["type"] == "message" for event in seen):
                    assert time.monotonic() < deadline, seen
                    if message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1):
                        seen.append(json.loads(message["data"]))
                consuming.cancel()  # while the turn is remembered (1.5 s)
                await asyncio.gather(consuming, return_exceptions=True)
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    if message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1):
                        seen.append(json.loads(message["data"]))
                marked = bool(await turns.redis.exists(f"answered:{turns.sent[-1]}"))
                kept = bool(await turns.redis.exists(f"{DEGRADED_PREFIX}{turns.sent[-1]}"))
            return seen, marked, kept

    seen, marked, kept = asyncio.run(scenario())
    assert seen[-1]["type"] == "message", f"something followed the whole reply: {seen[-1]}"
    assert marked, "a reply delivered whole was not marked answered: the next instance would answer it again"
    assert kept, "the memory of the answered turn is neither in Somabrain nor kept for the replay"


async def cut_off_from_redis(control: aioredis.Redis, database: int, seconds: float) -> None:
    """The connections to ``database`` but pub/sub ones closed, and no new connection taken, for
    ``seconds``: what a client sees of a Redis gone away (``maxclients`` refuses its reconnection)."""
    maxclients = (await control.config_get("maxclients"))["maxclients"]
    await control.config_set("maxclients", "1")
    try:
        for client in await control.client_list():
            if int(client["db"]) == database and "P" not in client["flags"]:
                await control.client_kill_filter(_id=client["id"])
        await asyncio.sleep(seconds)
    finally:
        await control.config_set("maxclients", maxclients)


def test_redis_failing_after_the_reply_went_out_does_not_answer_the_turn_again(stack, simulators):
    """Redis goes away while the turn is remembered, after its reply went out whole: the mark it
    then cannot write waits for Redis. The turn had come again once Redis was back, and the client
    got a second whole reply, charged twice."""

    async def scenario() -> tuple[list[dict[str, Any]], bool]:
        slow_memory = {"CHATPIPE_SOMABRAIN_TIMEOUT_SECONDS": "5"}
        async with running_worker(stack, simulators, **slow_memory) as turns:
            await turns.control(simulators.somabrain, latency_seconds=1.0)  # recall, then remember: 1 s each
            control = aioredis.Redis.from_url(stack["REDIS_URL"], decode_responses=True)  # database 0
            await control.ping()
            async with consumed_as_in_service(turns, "hello") as (pubsub, _, _consuming):
                seen: list[dict[str, Any]] = []
                outage: asyncio.Task[None] | None = None
                woke = deadline = time.monotonic() + 30
                while time.monotonic() < min(deadline, woke + 8):  # 8 s after Redis came back to answer again
                    if message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1):
                        seen.append(json.loads(message["data"]))
                    if outage is None and any(event["type"] == "message" for event in seen):
                        # The mark is written once the memory is (in 1 s): Redis is away then.
                        outage = asyncio.create_task(cut_off_from_redis(control, PRIVATE_DATABASE, 3))
                    if outage is not None and outage.done() and woke == deadline:
                        await outage
                        woke = time.monotonic()
                marked = bool(await turns.redis.exists(f"answered:{turns.sent[-1]}"))
            await control.aclose()
            return seen, marked

    seen, marked = asyncio.run(scenario())
    replies = [event for event in seen if event["type"] == "message"]
    assert len(replies) == 1, f"the turn was answered {len(replies)} times: {[event['type'] for event in seen]}"
    assert marked, "the reply was not marked answered"
