"""An OpenAI-compatible chat completions server with fault injection.

``POST /v1/chat/completions`` answers like the OpenAI API: a JSON completion, or with
``"stream": true`` Server-Sent Events chunks and, when ``stream_options.include_usage``
is set, a last chunk carrying ``usage``. Tokens are whitespace-separated words, so the
usage it reports is exact and tests can compare it with ``llm_tokens_total``.

When the request offers tools and the last user message asks to calculate
(``calc: 6*7``) or for the time, the reply is a ``tool_calls`` message; after the
tool's result comes back, it answers with that result. Streamed, the call comes in
pieces as OpenAI sends it: a first delta with its ``index``, ``id``, ``type``, name and
empty ``arguments``, then deltas with the same ``index`` and a few characters of the
arguments each.

Faults (``POST /control`` with any of these fields): ``latency_seconds`` (request to
last token), ``first_token_seconds``, ``error_rates`` (``{"429": 0.5, "503": 0.1}``),
``outage`` (every request answers 503), ``completion_words``, ``malformed`` (answers
200 with what is no completion: a body without ``choices``, or a stream whose second
chunk is cut-off JSON).

Example::

    uvicorn chatpipe.sim.llm:app --port 8081
    curl -X POST localhost:8081/control -d '{"error_rates": {"500": 1.0}}'
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

__all__ = ["LLMFaults", "app", "count_tokens"]


class LLMFaults(BaseModel):
    latency_seconds: float = Field(0.2, ge=0, le=120)
    first_token_seconds: float = Field(0.05, ge=0, le=120)
    error_rates: dict[int, float] = Field(default_factory=dict)
    outage: bool = False
    completion_words: int = Field(24, ge=1, le=10_000)
    malformed: bool = False


class _Stats(BaseModel):
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


app = FastAPI(title="LLM simulator (OpenAI-compatible)")
app.state.faults = LLMFaults()
app.state.stats = _Stats()

_CALC = re.compile(r"calc:\s*([0-9+\-*/(). ]+)", re.IGNORECASE)
#: Characters of a tool call's arguments per streamed delta (OpenAI sends a few at a time).
_ARGUMENTS_PIECE = 4


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: whitespace-separated words."""
    return len(text.split())


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(count_tokens(str(message.get("content") or "")) for message in messages)


def _tool_call_for(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not tools or not messages or messages[-1].get("role") != "user":
        return None
    offered = {tool.get("function", {}).get("name") for tool in tools}
    content = str(messages[-1].get("content") or "")
    if (match := _CALC.search(content)) and "calculator" in offered:
        name, arguments = "calculator", {"expression": match.group(1).strip()}
    elif "time" in content.lower() and "clock" in offered:
        name, arguments = "clock", {}
    elif content.lower().startswith("summarize:") and "summarize" in offered:
        name, arguments = "summarize", {"text": content.split(":", 1)[1].strip()}
    else:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}  # fmt: skip


def _answer(messages: list[dict[str, Any]], words: int) -> str:
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        head = f"The tool says: {last.get('content')}."
    else:
        head = f"You said: {' '.join(str(last.get('content') or '').split()[:12])}."
    filler = ("this simulated assistant keeps answering with plain words so usage is easy to count " * 100).split()
    body = head.split()
    return " ".join(body + filler[: max(0, words - len(body))])


def _error(status: int) -> JSONResponse:
    kinds = {429: "rate_limit_exceeded", 503: "service_unavailable"}
    body = {"error": {"message": f"simulated {status}", "type": kinds.get(status, "api_error"), "code": status}}
    return JSONResponse(body, status_code=status)


@app.post("/v1/chat/completions", response_model=None)
async def completions(request: Request) -> JSONResponse | StreamingResponse:
    faults: LLMFaults = app.state.faults
    stats: _Stats = app.state.stats
    stats.requests += 1
    body = await request.json()
    if faults.outage:
        stats.errors += 1
        return _error(503)
    for status, rate in faults.error_rates.items():
        if random.random() < rate:  # noqa: S311 - fault injection, not security
            stats.errors += 1
            return _error(int(status))
    messages = body.get("messages", [])
    model = body.get("model", "sim-large")
    if faults.malformed:
        return _malformed(bool(body.get("stream")), model, faults)
    tool_call = _tool_call_for(messages, body.get("tools") or [])
    text = "" if tool_call else _answer(messages, faults.completion_words)
    usage = {"prompt_tokens": _prompt_tokens(messages), "completion_tokens": count_tokens(text)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    stats.prompt_tokens += usage["prompt_tokens"]
    stats.completion_tokens += usage["completion_tokens"]
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:16]}"
    created = int(time.time())
    if not body.get("stream"):
        await asyncio.sleep(faults.latency_seconds)
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_call:
            message["tool_calls"] = [tool_call]
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if tool_call else "stop"}
        return JSONResponse({"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                             "choices": [choice], "usage": usage})  # fmt: skip
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(
        _stream(completion_id, created, model, text, tool_call, usage if include_usage else None, faults),
        media_type="text/event-stream",
    )


async def _stream(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    tool_call: dict[str, Any] | None,
    usage: dict[str, int] | None,
    faults: LLMFaults,
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
        return f"data: {json.dumps(payload)}\n\n"

    await asyncio.sleep(faults.first_token_seconds)
    if tool_call:
        function, arguments = tool_call["function"], tool_call["function"]["arguments"]
        yield chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": tool_call["id"], "type": "function",
             "function": {"name": function["name"], "arguments": ""}}]})  # fmt: skip
        for start in range(0, len(arguments), _ARGUMENTS_PIECE):
            piece = arguments[start : start + _ARGUMENTS_PIECE]
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        finish = "tool_calls"
    else:
        words = text.split(" ")
        pause = max(0.0, faults.latency_seconds - faults.first_token_seconds) / max(1, len(words))
        for index, word in enumerate(words):
            yield chunk({"role": "assistant", "content": word if index == 0 else f" {word}"})
            await asyncio.sleep(pause)
        finish = "stop"
    yield chunk({}, finish)
    if usage is not None:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": usage}  # fmt: skip
        yield f"data: {json.dumps(payload)}\n\n"
    yield "data: [DONE]\n\n"


def _malformed(stream: bool, model: str, faults: LLMFaults) -> JSONResponse | StreamingResponse:
    """A 200 that is no completion (the ``malformed`` fault): nothing of it is usage, so ``/stats`` counts none."""
    if not stream:
        return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "model": model})

    async def cut_off() -> AsyncIterator[str]:
        await asyncio.sleep(faults.first_token_seconds)
        first = {
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Cut"}, "finish_reason": None}],
        }
        yield f"data: {json.dumps(first)}\n\n"
        yield 'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": " of\n\n'

    return StreamingResponse(cut_off(), media_type="text/event-stream")


@app.get("/control")
async def get_control() -> LLMFaults:
    return app.state.faults


@app.post("/control")
async def set_control(changes: dict[str, Any]) -> LLMFaults:
    """Change faults while running; unknown fields are refused (422)."""
    app.state.faults = LLMFaults.model_validate({**app.state.faults.model_dump(), **changes})
    return app.state.faults


@app.get("/stats")
async def stats() -> _Stats:
    """What the simulator served, including the exact usage it reported."""
    return app.state.stats


@app.get("/v1/models", response_model=None)
async def models() -> dict[str, Any] | JSONResponse:
    """The models it serves, as OpenAI lists them (what a client probes the provider with)."""
    if app.state.faults.outage:
        return _error(503)
    return {"object": "list", "data": [{"id": "sim-large", "object": "model", "owned_by": "simulator"}]}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
