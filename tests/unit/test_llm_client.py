"""How the LLM client reads what a provider sends: OpenAI's streamed tool calls, and answers that
are no completion at all. The provider is an httpx mock transport replaying the exact bytes (no
server would add anything here); what is asserted is the reply and the scraped metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from chatobs import Telemetry, load_settings
from chatpipe.llm_client import LLMClient, LLMError, LLMReply
from chatpipe.settings import load_pipeline_settings
from tests.metrics_text import value


def sse(*payloads: dict[str, Any] | str) -> bytes:
    """A Server-Sent Events body: each payload as a ``data:`` event (a str as it is), then ``[DONE]``."""
    events = [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in (*payloads, "[DONE]")]
    return "".join(events).encode()


def delta(**fields: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "sim-large",
            "choices": [{"index": 0, "delta": fields, "finish_reason": None}]}  # fmt: skip


def arguments(index: int, piece: str) -> dict[str, Any]:
    return delta(tool_calls=[{"index": index, "function": {"arguments": piece}}])


USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}  # fmt: skip

#: Two parallel tool calls as OpenAI streams them: each call's first delta has its id, type, name and
#: empty arguments; then fragments of the arguments under the same index (here the two interleave).
PARALLEL_TOOL_CALLS = sse(
    delta(role="assistant", content=None, tool_calls=[{"index": 0, "id": "call_calc", "type": "function",
                                                       "function": {"name": "calculator", "arguments": ""}}]),
    arguments(0, '{"expr'),
    arguments(0, 'ession": "6'),
    delta(tool_calls=[{"index": 1, "id": "call_clock", "type": "function",
                       "function": {"name": "clock", "arguments": ""}}]),
    arguments(0, '*7"}'),
    arguments(1, "{}"),
    {**delta(), "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    USAGE,
)  # fmt: skip


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="worker")
    yield telemetry
    telemetry.shutdown()


def complete(telemetry: Telemetry, body: bytes, *, stream: bool = True) -> LLMReply:
    """One ``complete`` call against a provider that answers ``body`` (200)."""

    def provider(request: httpx.Request) -> httpx.Response:
        media_type = "text/event-stream" if stream else "application/json"
        return httpx.Response(200, content=body, headers={"Content-Type": media_type})

    async def call() -> LLMReply:
        settings = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": "http://llm.test/v1"})
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            client = LLMClient(http, settings, telemetry.llm)
            return await client.complete([{"role": "user", "content": "calc: 6*7"}], stream=stream)

    return asyncio.run(call())


def scraped(telemetry: Telemetry) -> str:
    return telemetry.scrape()[2].decode()


def test_streamed_tool_call_deltas_are_put_together_by_index(telemetry):
    reply = complete(telemetry, PARALLEL_TOOL_CALLS)
    calculator = {"name": "calculator", "arguments": '{"expression": "6*7"}'}
    assert reply.tool_calls == [
        {"id": "call_calc", "type": "function", "function": calculator},
        {"id": "call_clock", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
    ]
    assert (reply.content, reply.prompt_tokens, reply.completion_tokens) == ("", 12, 30)
    assert value(scraped(telemetry), "llm_errors_total") == 0


def test_whole_tool_calls_without_index_stay_separate(telemetry):
    """Some OpenAI-compatible servers send each call whole, without ``index``."""
    whole = [{"id": f"call_{n}", "type": "function", "function": {"name": "clock", "arguments": "{}"}} for n in (1, 2)]
    reply = complete(telemetry, sse(delta(role="assistant", tool_calls=whole), USAGE))
    assert reply.tool_calls == whole


MALFORMED = {
    "a chunk cut off mid-JSON": (sse(delta(role="assistant", content="Hel"), '{"choices": [{"delta": {"cont'), True),
    "a chunk that is JSON but no object": (sse(delta(content="Hello"), "null"), True),
    "content that is not text": (sse(delta(content={"text": "Hello"})), True),
    "usage that is not a number": (sse(delta(content="Hi"), {**USAGE, "usage": {"prompt_tokens": "many"}}), True),
    "a tool call without a name": (sse(delta(tool_calls=[{"index": 0, "id": "call_1", "function": {}}])), True),
    "a body without choices": (json.dumps({"id": "chatcmpl-1", "object": "chat.completion"}).encode(), False),
    "a body that is not JSON": (b"<html>502 Bad Gateway</html>", False),
    "a body that is a JSON list": (b"[]", False),
}


@pytest.mark.parametrize("body, stream", MALFORMED.values(), ids=MALFORMED.keys())
def test_an_answer_that_is_no_completion_is_an_llm_error_and_counted(telemetry, body, stream):
    with pytest.raises(LLMError) as raised:
        complete(telemetry, body, stream=stream)
    assert raised.value.code == "other"
    assert "malformed LLM response" in str(raised.value)
    text = scraped(telemetry)
    assert value(text, "llm_requests_total") == 1
    assert value(text, "llm_errors_total", provider="simulator", code="other") == 1
    assert value(text, "llm_latency_seconds_count") == 1  # a failed call's duration counts too


def test_a_provider_that_trickles_past_the_timeout_fails_then_and_its_wait_is_in_the_latency(telemetry):
    # Every read comes within httpx's timeout, the whole answer does not: the call's deadline ends it.
    class Trickle(httpx.AsyncByteStream):
        async def __aiter__(self):
            for _ in range(20):
                await asyncio.sleep(0.1)
                yield f"data: {json.dumps(delta(content='.'))}\n\n".encode()

    def provider(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Trickle(), headers={"Content-Type": "text/event-stream"})

    async def call() -> float:
        settings = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": "http://llm.test/v1",
                                           "CHATPIPE_LLM_TIMEOUT_SECONDS": "0.5"})  # fmt: skip
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            started = asyncio.get_running_loop().time()
            with pytest.raises(LLMError) as raised:
                await LLMClient(http, settings, telemetry.llm).complete([{"role": "user", "content": "hi"}])
            assert raised.value.code == "timeout"
            return asyncio.get_running_loop().time() - started

    took = asyncio.run(call())
    assert took < 1.5, f"the call ran {took:.1f}s past a 0.5s deadline"
    text = scraped(telemetry)
    assert value(text, "llm_errors_total", code="timeout") == 1
    assert value(text, "llm_latency_seconds_count") == 1
    assert value(text, "llm_latency_seconds_sum") >= 0.5, "a hung call must weigh in the latency"


def test_the_time_spent_handing_tokens_on_is_not_the_providers(telemetry):
    body = sse(delta(content="a"), delta(content="b"), delta(content="c"), USAGE)

    def provider(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": "text/event-stream"})

    async def slow_relay(token: str) -> None:
        await asyncio.sleep(0.2)  # a slow Redis publish

    async def call() -> None:
        settings = load_pipeline_settings({"CHATPIPE_LLM_BASE_URL": "http://llm.test/v1"})
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            await LLMClient(http, settings, telemetry.llm).complete([{"role": "user", "content": "hi"}],
                                                                   on_token=slow_relay)  # fmt: skip

    asyncio.run(call())
    text = scraped(telemetry)
    assert value(text, "llm_latency_seconds_count") == 1
    assert value(text, "llm_latency_seconds_sum") < 0.3, "the relay's 0.6 s was counted as the LLM's"


def test_a_stream_without_usage_records_no_token_counts(telemetry):
    complete(telemetry, sse(delta(content="Hello")))
    text = scraped(telemetry)
    assert value(text, "llm_latency_seconds_count") == 1
    assert value(text, "llm_request_tokens_count") == 0, "an observation of 0 tokens for usage not reported"
