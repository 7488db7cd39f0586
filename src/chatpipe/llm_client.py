"""An OpenAI-compatible chat client that records the LLM metrics of every call.

Streaming (``stream`` with ``include_usage``) measures time to first token; the usage
the provider reports is what ``llm_tokens_total`` counts. Failures are classified into
``llm_errors_total{code}`` and re-raised as :class:`LLMError`.

Example::

    client = LLMClient(http, settings, telemetry.llm)
    reply = await client.complete(messages, mode="normal", on_token=print)
"""

from __future__ import annotations

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
    ) -> LLMReply:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = tools
        self._recorder.request(self.model, self.provider, mode)
        started = time.perf_counter()
        try:
            if stream:
                reply = await self._stream(body, started, on_token)
            else:
                response = await self._http.post(self._url, json=body, headers=self._headers, timeout=self._timeout)
                self._raise_for_status(response)
                reply = self._parse(response.json())
        except httpx.TimeoutException as error:
            raise self._failed(LLMError("timeout", f"LLM call timed out: {error}")) from error
        except httpx.TransportError as error:
            raise self._failed(LLMError("connection", f"LLM unreachable: {error}")) from error
        except LLMError as error:
            raise self._failed(error) from error
        self._recorder.latency(time.perf_counter() - started, self.model, self.provider, mode)
        self._recorder.tokens(self.model, self.provider, prompt=reply.prompt_tokens, completion=reply.completion_tokens)
        return reply

    def _failed(self, error: LLMError) -> LLMError:
        self._recorder.error(self.provider, error.code)
        return error

    @staticmethod
    def _raise_for_status(response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise LLMError(llm_error_code(response.status_code), f"LLM answered {response.status_code}")

    @staticmethod
    def _parse(body: dict[str, Any]) -> LLMReply:
        message = body["choices"][0]["message"]
        usage = body.get("usage") or {}
        return LLMReply(
            content=message.get("content") or "",
            tool_calls=message.get("tool_calls") or [],
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )

    async def _stream(
        self, body: dict[str, Any], started: float, on_token: Callable[[str], Awaitable[None]] | None
    ) -> LLMReply:
        reply = LLMReply()
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
                chunk = json.loads(data)
                if usage := chunk.get("usage"):
                    reply.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    reply.completion_tokens = int(usage.get("completion_tokens", 0))
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if first and (delta.get("content") or delta.get("tool_calls")):
                        first = False
                        self._recorder.time_to_first_token(time.perf_counter() - started, self.model, self.provider)
                    if text := delta.get("content"):
                        reply.content += text
                        if on_token is not None:
                            await on_token(text)
                    for call in delta.get("tool_calls") or ():
                        reply.tool_calls.append({k: v for k, v in call.items() if k != "index"})
        return reply
