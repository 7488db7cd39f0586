"""LLM usage: requests, latency, time to first token, tokens, errors."""

from __future__ import annotations

from chatobs.recorders._base import Recorder, Timer, checked_amount, guarded

__all__ = ["LLMRecorder", "llm_error_code"]


def llm_error_code(status: int | None = None, *, timeout: bool = False, connection: bool = False) -> str:
    """Map a failed LLM call to the bounded ``code`` label of ``llm_errors_total``.

    >>> llm_error_code(429), llm_error_code(503), llm_error_code(timeout=True)
    ('rate_limited', 'http_5xx', 'timeout')
    """
    # Never raises (it sits in error handlers): a status that is not an int is just `other`.
    try:
        if timeout:
            return "timeout"
        if connection:
            return "connection"
        if status.__class__ is not int:
            return "other"
        if status == 429:
            return "rate_limited"
        if 400 <= status < 500:  # type: ignore[operator]
            return "http_4xx"
        if 500 <= status < 600:  # type: ignore[operator]
            return "http_5xx"
    except Exception:  # noqa: BLE001 - a flag whose truth value raises
        return "other"
    return "other"


class LLMRecorder(Recorder):
    """Recording helpers for LLM calls (worker and tool executor).

    Example::

        llm = telemetry.llm
        llm.request("gpt-4o-mini", "openai", mode="normal")
        with llm.time_call("gpt-4o-mini", "openai", mode="normal"):
            reply = await client.chat(...)
        llm.tokens("gpt-4o-mini", "openai", prompt=reply.usage.prompt_tokens,
                   completion=reply.usage.completion_tokens)
    """

    @guarded("llm_requests_total")
    def request(self, model: str, provider: str, mode: str = "normal") -> None:
        """One request sent (``mode``: normal or degraded_bypass_somabrain)."""
        self._add("llm_requests_total", 1, model, provider, mode)

    @guarded("llm_latency_seconds")
    def latency(self, seconds: float, model: str, provider: str, mode: str = "normal") -> None:
        self._observe("llm_latency_seconds", seconds, model, provider, mode)

    def time_call(self, model: str, provider: str, mode: str = "normal") -> Timer:
        """``with llm.time_call(...)`` records the block as ``llm_latency_seconds``."""
        return Timer(lambda seconds: self.latency(seconds, model, provider, mode))

    @guarded("llm_time_to_first_token_seconds")
    def time_to_first_token(self, seconds: float, model: str, provider: str) -> None:
        self._observe("llm_time_to_first_token_seconds", seconds, model, provider)

    @guarded("llm_tokens_total")
    def tokens(self, model: str, provider: str, *, prompt: int, completion: int) -> None:
        """Usage reported by the provider for one request."""
        # Both counts checked before either is recorded: one call, all or nothing.
        for direction, count in (("in", checked_amount(prompt)), ("out", checked_amount(completion))):
            self._add("llm_tokens_total", count, model, provider, direction)
            self._observe("llm_request_tokens", count, model, provider, direction)

    @guarded("llm_errors_total")
    def error(self, provider: str, code: str) -> None:
        """One failed request; see :func:`llm_error_code` for ``code``."""
        self._add("llm_errors_total", 1, provider, code)
