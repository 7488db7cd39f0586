"""An OpenAI-compatible chat client that records the LLM metrics of every call.

Streaming (``stream`` with ``include_usage``) measures time to first token; the usage
the provider reports is what ``llm_tokens_total`` counts. Streamed tool calls are put
together from their deltas, as OpenAI sends them (see :class:`_ToolCalls`). Failures are
classified into ``llm_errors_total{code}`` and re-raised as :class:`LLMError`; a response
that is not a chat completion (a chunk that is not JSON, a body without ``choices``, a
tool call without a name) is one too, with code ``other``.

Example::

    client = LLMClient(http, settings, telemetry.llm)
    reply = await client.complete(messages, mode="normal", on_token=print)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from chatobs.recorders import LLMRecorder, llm_error_code
from chatpipe.settings import PipelineSettings

__all__ = ["LLMClient", "LLMError", "LLMReply"]


class LLMError(Exception):
    """The provider failed; ``code`` is the ``llm_errors_total`` label."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class LLMReply:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Whether the provider reported usage (a stream may not): without it, no token counts.
    usage_reported: bool = False


@dataclass
class _Call:
    """One call's clock: its time so far, less the time spent handing tokens on."""

    mode: str
    started: float = field(default_factory=time.perf_counter)
    relayed: float = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.relayed


class LLMClient:
    def __init__(self, http: httpx.AsyncClient, settings: PipelineSettings, recorder: LLMRecorder):
        self._http = http
        self._url = f"{str(settings.llm_base_url).rstrip('/')}/chat/completions"
        self._headers = {"Authorization": f"Bearer {settings.llm_api_key}"} if settings.llm_api_key else {}
        self._timeout = settings.llm_timeout_seconds
        self.model = settings.llm_model
        self.provider = settings.llm_provider
        self._recorder = recorder

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        mode: str = "normal",
        tools: list[dict[str, Any]] | None = None,
        stream: bool = True,
        on_token: Callable[[str], Awaitable[None]] | None = None,
        timeout: float | None = None,
    ) -> LLMReply:
        """One call; ``timeout`` (at most ``CHATPIPE_LLM_TIMEOUT_SECONDS``) is a caller's shorter
        bound: a caller that cancels the call instead leaves it counted in ``llm_requests_total``
        and in neither its latency nor its errors."""
        limit = self._timeout if timeout is None else min(timeout, self._timeout)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = tools
        self._recorder.request(self.model, self.provider, mode)
        call = _Call(mode)
        # The whole call, however the provider paces it: httpx's timeout bounds each read only.
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                if stream:
                    reply = await self._stream(body, call, on_token)
                else:
                    response = await self._http.post(self._url, json=body, headers=self._headers,
                                                     timeout=limit)  # fmt: skip
                    self._raise_for_status(response)
                    reply = _parse(response.content)
        except TimeoutError as error:
            if not deadline.expired():
                raise  # not this call's deadline (the token relay's own, say)
            raise self._failed(call, LLMError("timeout", f"LLM call took over {limit:g}s")) from error
        except httpx.TimeoutException as error:
            raise self._failed(call, LLMError("timeout", f"LLM call timed out: {error}")) from error
        except httpx.TransportError as error:
            raise self._failed(call, LLMError("connection", f"LLM unreachable: {error}")) from error
        except httpx.DecodingError as error:  # a body its Content-Encoding does not decode: malformed too
            raise self._failed(call, LLMError("other", f"malformed LLM response: {error}")) from error
        except LLMError as error:
            raise self._failed(call, error) from error
        self._recorder.latency(call.seconds(), self.model, self.provider, mode)
        if reply.usage_reported:
            self._recorder.tokens(self.model, self.provider, prompt=reply.prompt_tokens,
                                  completion=reply.completion_tokens)  # fmt: skip
        return reply

    def _failed(self, call: _Call, error: LLMError) -> LLMError:
        # A failed call's duration counts too: a provider that hangs until the timeout must show
        # in the latency quantiles, not leave them to the fast successes.
        self._recorder.latency(call.seconds(), self.model, self.provider, call.mode)
        self._recorder.error(self.provider, error.code)
        return error

    @staticmethod
    def _raise_for_status(response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise LLMError(llm_error_code(response.status_code), f"LLM answered {response.status_code}")

    async def _stream(
        self, body: dict[str, Any], call: _Call, on_token: Callable[[str], Awaitable[None]] | None
    ) -> LLMReply:
        reply = LLMReply()
        tool_calls = _ToolCalls()
        first = True
        async with self._http.stream("POST", self._url, json=body, headers=self._headers,
                                     timeout=self._timeout) as response:  # fmt: skip
            if response.status_code >= 400:
                await response.aread()
                self._raise_for_status(response)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = _read_chunk(data)
                if chunk.usage is not None:
                    reply.prompt_tokens, reply.completion_tokens = chunk.usage
                    reply.usage_reported = True
                if first and (chunk.text or chunk.tool_call_deltas):
                    first = False
                    self._recorder.time_to_first_token(call.seconds(), self.model, self.provider)
                for delta in chunk.tool_call_deltas:
                    tool_calls.add(delta)
                if chunk.text:
                    reply.content += chunk.text
                    if on_token is not None:
                        # Handing the token on (to Redis) is the caller's time, not the provider's.
                        relay_started = time.perf_counter()
                        await on_token(chunk.text)
                        call.relayed += time.perf_counter() - relay_started
        reply.tool_calls = tool_calls.calls()
        return reply


#: What a response of the wrong shape raises while it is read: a ``KeyError`` or ``IndexError``
#: for a missing field, a ``TypeError`` or ``AttributeError`` for a field of the wrong type,
#: a ``ValueError`` for text that is not JSON (``JSONDecodeError``) or not a number.
_MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError)


def _malformed(what: str, error: Exception) -> LLMError:
    return LLMError("other", f"malformed LLM response ({what}): {type(error).__name__}: {error}")


def _usage(usage: Any) -> tuple[int, int]:
    """``(prompt, completion)`` tokens of a ``usage`` object; a count given as null is 0."""
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _text(value: Any, name: str) -> str:
    """A text field (``content``, ``arguments``): a string, or null for none."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{name} is a {type(value).__name__}, not a string")
    return value


def _parse(raw: bytes) -> LLMReply:
    """A whole (non-streamed) chat completion; :class:`LLMError` ``other`` if it is not one."""
    try:
        body = json.loads(raw)
        message = body["choices"][0]["message"]
        calls = _ToolCalls()
        for call in message.get("tool_calls") or ():
            calls.add(call)
        content = _text(message.get("content"), "content")
        usage = body.get("usage")
        prompt, completion = _usage(usage or {})
        return LLMReply(content, calls.calls(), prompt_tokens=prompt, completion_tokens=completion,
                        usage_reported=bool(usage))  # fmt: skip
    except _MALFORMED as error:
        raise _malformed("completion", error) from None


@dataclass
class _Chunk:
    text: str = ""
    tool_call_deltas: list[dict[str, Any]] = field(default_factory=list)
    usage: tuple[int, int] | None = None


def _read_chunk(data: str) -> _Chunk:
    """One streamed ``data:`` payload; :class:`LLMError` ``other`` if it is not a completion chunk."""
    try:
        payload = json.loads(data)
        chunk = _Chunk()
        if usage := payload.get("usage"):
            chunk.usage = _usage(usage)
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") or {}
            chunk.text += _text(delta.get("content"), "content")
            chunk.tool_call_deltas.extend(delta.get("tool_calls") or ())
        return chunk
    except _MALFORMED as error:
        raise _malformed("stream chunk", error) from None


class _ToolCalls:
    """Tool calls put together from their parts.

    OpenAI streams one call as several deltas sharing an ``index``: the first carries ``id``,
    ``type`` and ``function.name`` with empty ``arguments``, the later ones only fragments of
    ``function.arguments``, which are concatenated. A part without ``index`` is a whole call
    (a non-streamed message, or a provider that sends each call at once), and so is a part
    whose ``id`` differs from that of the call already at its index (a provider that numbers
    every call 0). Arguments given as a JSON object rather than its text are kept as text.
    """

    def __init__(self) -> None:
        self._calls: list[dict[str, Any]] = []
        self._at_index: dict[int, dict[str, Any]] = {}

    def add(self, part: dict[str, Any]) -> None:
        """Take in one part; :class:`LLMError` ``other`` if it is not a tool call (part)."""
        try:
            self._add(part)
        except _MALFORMED as error:
            raise _malformed("tool call", error) from None

    def _add(self, part: dict[str, Any]) -> None:
        index = part.get("index")
        function = part.get("function") or {}
        call = self._at_index.get(index) if isinstance(index, int) else None
        if call is None or (part.get("id") and call["id"] and part["id"] != call["id"]):
            call = {"id": "", "type": "", "function": {"name": "", "arguments": ""}}
            self._calls.append(call)
            if isinstance(index, int):
                self._at_index[index] = call
        # The first part names the call; later ones repeat it at most.
        call["id"] = call["id"] or str(part.get("id") or "")
        call["type"] = call["type"] or str(part.get("type") or "")
        call["function"]["name"] = call["function"]["name"] or str(function.get("name") or "")
        arguments = function.get("arguments")
        if isinstance(arguments, dict | list):
            arguments = json.dumps(arguments)
        call["function"]["arguments"] += _text(arguments, "arguments")

    def calls(self) -> list[dict[str, Any]]:
        """The calls in the order they came; :class:`LLMError` ``other`` if one has no function name
        (the worker could not run it)."""
        for call in self._calls:
            if not call["function"]["name"]:
                raise LLMError("other", f"malformed LLM response: tool call {call['id'] or '(no id)'} has no name")
            call["type"] = call["type"] or "function"  # the only type there is
        return self._calls
