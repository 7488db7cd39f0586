"""The tool executor, run in this process against the session's real Redis and Kafka-protocol
broker, with the LLM simulator as a server: tool requests in, the results the worker waits on out."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from chatobs import Telemetry, load_settings
from chatpipe.events import tool_result_key
from chatpipe.kafka import start_producer
from chatpipe.settings import load_pipeline_settings
from chatpipe.tools.executor import ToolExecutor
from tests.metrics_text import value

LLM_SECONDS = 3.0


def test_a_slow_tool_call_does_not_hold_up_the_ones_behind_it(stack, start_service):
    """A ``summarize`` waiting on a slow LLM, then a ``clock`` call, in one batch: the clock's
    result is there long before the summary's (one after another, it waited the LLM's time)."""
    llm = start_service({}, app="chatpipe.sim.llm:app", ready_path="/health").base_url
    topic = f"chat.tools.{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[dict[str, float], str]:
        settings = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": f"{llm}/v1", "CHATPIPE_TOOL_TOPIC": topic})
        telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="tool_executor")
        redis = aioredis.Redis.from_url(stack["REDIS_URL"])
        producer = await start_producer(stack["KAFKA_BOOTSTRAP_SERVERS"], asyncio.Event())
        assert producer is not None
        consumer = AIOKafkaConsumer(bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"], group_id=topic,
                                    enable_auto_commit=False, auto_offset_reset="earliest")  # fmt: skip
        try:
            async with httpx.AsyncClient() as http:
                (await http.post(f"{llm}/control", json={"latency_seconds": LLM_SECONDS})).raise_for_status()
                calls = {"summarize": {"text": "a long text " * 20}, "clock": {}}
                ids = {name: uuid.uuid4().hex for name in calls}
                batch = producer.create_batch()
                for name, arguments in calls.items():
                    request = {"call_id": ids[name], "name": name, "arguments": json.dumps(arguments),
                               "session_id": "s", "tenant": "acme"}  # fmt: skip
                    batch.append(key=b"s", value=json.dumps(request).encode(), timestamp=None)
                await (await producer.send_batch(batch, topic, partition=0))
                await consumer.start()
                consumer.assign([TopicPartition(topic, 0)])
                executor = ToolExecutor(telemetry, settings, redis, http)
                started = time.monotonic()
                arrived: dict[str, float] = {}

                async def wait_for_results() -> None:
                    for name in ("clock", "summarize"):
                        answer = await redis.blpop([tool_result_key(ids[name])], timeout=30)
                        assert answer is not None and json.loads(answer[1])["ok"], (name, answer)
                        arrived[name] = time.monotonic() - started

                waiting = asyncio.create_task(wait_for_results())
                while not await executor.execute_round(consumer):
                    pass
                await waiting
                return arrived, telemetry.scrape()[2].decode()
        finally:
            await consumer.stop()
            await producer.stop()
            await redis.aclose()
            telemetry.shutdown()

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
