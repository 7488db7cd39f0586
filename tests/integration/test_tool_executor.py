"""The tool executor, run in this process against the session's real Redis and Kafka-protocol
broker, with the LLM simulator as a server: tool requests in, the results the worker waits on out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from chatobs import Telemetry, load_settings
from chatpipe.events import tool_abandoned_key, tool_result_key
from chatpipe.kafka import start_producer
from chatpipe.settings import load_pipeline_settings
from chatpipe.tools.executor import ToolExecutor
from tests.metrics_text import value

LLM_SECONDS = 3.0


def test_a_slow_tool_call_does_not_hold_up_the_ones_behind_it(stack, start_service):
    """A ``summarize`` waiting on a slow LLM, then a ``clock`` call, in one batch: the clock's
    result is there long before the summary's (one after another, it waited the LLM's time)."""
    llm = start_service({}, app="chatpipe.sim.llm:app", ready_path="/health").base_url

    async def scenario() -> tuple[dict[str, float], str]:
        async with _executor(stack, llm) as executing, httpx.AsyncClient() as http:
            (await http.post(f"{llm}/control", json={"latency_seconds": LLM_SECONDS})).raise_for_status()
            calls = {"summarize": {"text": "a long text " * 20}, "clock": {}}
            ids = {name: uuid.uuid4().hex for name in calls}
            batch = executing.producer.create_batch()
            for name, arguments in calls.items():
                request = {"call_id": ids[name], "name": name, "arguments": json.dumps(arguments),
                           "session_id": "s", "tenant": "acme"}  # fmt: skip
                batch.append(key=b"s", value=json.dumps(request).encode(), timestamp=None)
            await (await executing.producer.send_batch(batch, executing.topic, partition=0))
            started = time.monotonic()
            arrived: dict[str, float] = {}

            async def wait_for_results() -> None:
                for name in ("clock", "summarize"):
                    assert (await executing.result(ids[name]))["ok"], name
                    arrived[name] = time.monotonic() - started

            waiting = asyncio.create_task(wait_for_results())
            while not await executing.executor.execute_round(executing.consumer):
                pass
            await waiting
            return arrived, executing.metrics()

    arrived, text = asyncio.run(scenario())
    assert arrived["summarize"] >= LLM_SECONDS
    assert arrived["clock"] < LLM_SECONDS / 2, f"the clock call waited behind the summary: {arrived}"
    assert value(text, "tool_calls_total", tool="clock", result="success") == 1
    assert value(text, "tool_calls_total", tool="summarize", result="success") == 1


def test_a_tool_call_is_labelled_by_a_known_tool_and_its_turns_mode(stack, start_service):
    llm = start_service({}, app="chatpipe.sim.llm:app", ready_path="/health").base_url

    async def scenario() -> str:
        settings = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": f"{llm}/v1"})
        telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="tool_executor")
        redis = aioredis.Redis.from_url(stack["REDIS_URL"])
        try:
            async with httpx.AsyncClient() as http:
                executor = ToolExecutor(telemetry, settings, redis, http)
                request = {"call_id": "c1", "name": "summarize", "mode": "degraded_bypass_somabrain",
                           "arguments": json.dumps({"text": "a text"})}  # fmt: skip
                summary = await executor.execute(request)
                assert summary["ok"], summary
                for made_up in ("teleport", "launch_rockets", "x" * 40):  # names an LLM made up
                    assert not (await executor.execute({"call_id": "c2", "name": made_up, "arguments": "{}"}))["ok"]
            return telemetry.scrape()[2].decode()
        finally:
            await redis.aclose()
            telemetry.shutdown()

    text = asyncio.run(scenario())
    assert value(text, "llm_requests_total", mode="degraded_bypass_somabrain") == 1, "the turn's mode was lost"
    assert value(text, "tool_calls_total", tool="summarize", result="success") == 1
    assert value(text, "tool_calls_total", tool="other", result="rejected") == 3
    assert "teleport" not in text, "a made-up tool name took a label slot"


def test_a_summary_whose_llm_outlasts_the_tool_timeout_is_counted_in_the_llm_metrics(stack, start_service):
    """The executor gives up on a tool after ``CHATPIPE_TOOL_TIMEOUT_SECONDS``, shorter than the
    LLM's own timeout: cancelled from outside, the LLM call was counted among the requests and in
    neither its latency nor its errors, so the error ratio read low and the slowest calls were missing."""
    llm = start_service({}, app="chatpipe.sim.llm:app", ready_path="/health").base_url

    async def scenario() -> tuple[dict[str, object], str]:
        settings = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": f"{llm}/v1", "CHATPIPE_TOOL_TIMEOUT_SECONDS": "1",
                                           "CHATPIPE_LLM_TIMEOUT_SECONDS": "30"})  # fmt: skip
        telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="tool_executor")
        redis = aioredis.Redis.from_url(stack["REDIS_URL"])
        try:
            async with httpx.AsyncClient() as http:
                (await http.post(f"{llm}/control", json={"latency_seconds": LLM_SECONDS})).raise_for_status()
                executor = ToolExecutor(telemetry, settings, redis, http)
                request = {"call_id": "c1", "name": "summarize", "arguments": json.dumps({"text": "a text"})}
                result = await executor.execute(request)
            return result, telemetry.scrape()[2].decode()
        finally:
            await redis.aclose()
            telemetry.shutdown()

    result, text = asyncio.run(scenario())
    assert not result["ok"] and "0.9s" in str(result["error"]), result
    assert value(text, "tool_calls_total", tool="summarize", result="timeout") == 1
    assert value(text, "llm_requests_total") == 1
    assert value(text, "llm_errors_total", code="timeout") == 1
    assert value(text, "llm_latency_seconds_count") == 1


@contextlib.asynccontextmanager
async def _executor(environment: dict[str, str], llm: str, **settings: str) -> AsyncIterator[_Executing]:
    """A tool executor on ``environment``'s Redis and broker, a fresh topic, and a producer and
    consumer of it (the consumer assigned its partition 0)."""
    topic = f"chat.tools.{uuid.uuid4().hex[:8]}"
    pipeline = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": f"{llm}/v1", "CHATPIPE_TOOL_TOPIC": topic, **settings})
    telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="tool_executor")
    redis = aioredis.Redis.from_url(environment["REDIS_URL"])
    producer = await start_producer(environment["KAFKA_BOOTSTRAP_SERVERS"], asyncio.Event())
    assert producer is not None
    consumer = AIOKafkaConsumer(bootstrap_servers=environment["KAFKA_BOOTSTRAP_SERVERS"], group_id=topic,
                                enable_auto_commit=False, auto_offset_reset="earliest")  # fmt: skip
    try:
        async with httpx.AsyncClient() as http:
            await consumer.start()
            consumer.assign([TopicPartition(topic, 0)])
            executor = ToolExecutor(telemetry, pipeline, redis, http)
            yield _Executing(executor, telemetry, redis, producer, consumer, topic)
    finally:
        await consumer.stop()
        await producer.stop()
        await redis.aclose()
        telemetry.shutdown()


@dataclass
class _Executing:
    executor: ToolExecutor
    telemetry: Telemetry
    redis: aioredis.Redis
    producer: AIOKafkaProducer
    consumer: AIOKafkaConsumer
    topic: str

    async def request(self, name: str, arguments: dict[str, object]) -> str:
        """Send a tool request as the worker does; its call id."""
        call_id = uuid.uuid4().hex
        request = {"call_id": call_id, "name": name, "arguments": json.dumps(arguments), "session_id": "s",
                   "tenant": "acme", "mode": "normal"}  # fmt: skip
        await self.producer.send_and_wait(self.topic, json.dumps(request).encode(), key=b"s", partition=0)
        return call_id

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The executor's loop as in the service (rounds; a failed one is tried again), stopped on exit."""
        stopping = asyncio.Event()
        loop = asyncio.create_task(self.executor.consume(self.consumer, stopping))
        try:
            yield
        finally:
            stopping.set()
            await loop

    async def result(self, call_id: str) -> dict[str, object]:
        """The result the worker would read for ``call_id`` (waits for it)."""
        answer = await self.redis.blpop([tool_result_key(call_id)], timeout=20)
        assert answer is not None, f"no result for call {call_id}"
        return json.loads(answer[1])

    def metrics(self) -> str:
        return self.telemetry.scrape()[2].decode()


def test_a_result_redis_cannot_take_is_sent_once_it_is_back_and_the_tool_is_not_run_again(own_stack, start_service):
    """Redis down when a ``summarize`` finished: the request came again about once a second, and
    each time the tool ran again from scratch, counted in ``tool_calls_total`` and billed by the
    LLM (five successful calls, and five LLM requests, for one call no one received)."""
    local = own_stack()
    llm = start_service({}, app="chatpipe.sim.llm:app", ready_path="/health").base_url

    async def scenario() -> tuple[int, str]:
        async with _executor(local.environment, llm, CHATPIPE_TOOL_TIMEOUT_SECONDS="30") as executing:
            call_id = await executing.request("summarize", {"text": "a text to summarize"})
            local.stop_server("redis")
            async with executing.running():
                await asyncio.sleep(5)  # the request comes again, and again, while Redis is down
                local.start_server("redis")
                assert (await executing.result(call_id))["ok"]
            return await executing.redis.llen(tool_result_key(call_id)), executing.metrics()

    results_left, text = asyncio.run(scenario())
    assert results_left == 0, "the result was pushed more than once"
    assert value(text, "tool_calls_total", tool="summarize", result="success") == 1
    assert value(text, "llm_requests_total") == 1, "the summary's LLM call was made again for each delivery"


def test_a_request_the_worker_stopped_waiting_for_is_not_run(stack, start_service):
    """A backlog after an outage: a request whose worker stopped waiting for it (it answered
    without the result, and marked the call abandoned) is not run: that spent the LLM on no one.
    It is counted (`result="abandoned"`), with no duration: it was only logged before."""
    llm = start_service({}, app="chatpipe.sim.llm:app", ready_path="/health").base_url

    async def scenario() -> tuple[int, str]:
        async with _executor(stack, llm) as executing:
            stale = await executing.request("summarize", {"text": "a text"})
            await executing.redis.set(tool_abandoned_key(stale), "1", ex=60)  # as the worker does when it gives up
            fresh = await executing.request("clock", {})
            async with executing.running():
                assert (await executing.result(fresh))["ok"]
            return await executing.redis.llen(tool_result_key(stale)), executing.metrics()

    stale_results, text = asyncio.run(scenario())
    assert stale_results == 0
    assert value(text, "tool_calls_total", tool="summarize", result="abandoned") == 1
    assert value(text, "tool_call_seconds_count", tool="summarize") == 0  # nothing ran: no duration
    assert value(text, "llm_requests_total") == 0
    assert value(text, "tool_calls_total", tool="clock", result="success") == 1


def test_arguments_that_are_json_but_not_an_object_are_rejected_not_an_executor_error(stack):
    """``"6*7"``, a list or ``null`` from the LLM are malformed arguments, as bad JSON is: they
    were counted as ``result="error"`` (an ``AttributeError`` on ``.get``), an executor failure."""

    async def scenario() -> tuple[list[dict[str, object]], str]:
        settings = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": "http://127.0.0.1:9/v1"})
        telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="tool_executor")
        redis = aioredis.Redis.from_url(stack["REDIS_URL"])
        try:
            async with httpx.AsyncClient() as http:
                executor = ToolExecutor(telemetry, settings, redis, http)
                results = [await executor.execute({"call_id": "c", "name": "calculator", "arguments": arguments})
                           for arguments in ('"6*7"', '["6*7"]', "null", '{"expression": }')]  # fmt: skip
            return results, telemetry.scrape()[2].decode()
        finally:
            await redis.aclose()
            telemetry.shutdown()

    results, text = asyncio.run(scenario())
    assert all(not result["ok"] and "AttributeError" not in str(result["error"]) for result in results), results
    assert value(text, "tool_calls_total", tool="calculator", result="rejected") == 4
    assert value(text, "tool_calls_total", tool="calculator", result="error") == 0
