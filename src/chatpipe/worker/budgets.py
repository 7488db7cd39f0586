"""Per-tenant token and message budgets, kept in Redis per time window.

Allowances come from settings (``CHATPIPE_TOKEN_BUDGET``, ``CHATPIPE_TENANT_TOKEN_BUDGETS``,
and the message equivalents); usage is counted in Redis so every worker shares it.
A request is refused when the tenant has already spent its allowance; the refusal is
counted in ``tenant_budget_*_overruns_total``.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from chatobs.recorders import BudgetRecorder
from chatpipe.settings import PipelineSettings

__all__ = ["BudgetExceededError", "Budgets"]


class BudgetExceededError(Exception):
    """The tenant's budget is spent; the message says which and how much."""


class Budgets:
    def __init__(self, redis: aioredis.Redis, settings: PipelineSettings, recorder: BudgetRecorder):
        self._redis = redis
        self._settings = settings
        self._recorder = recorder

    def _keys(self, tenant: str) -> tuple[str, str]:
        window = int(time.time()) // self._settings.budget_window_seconds
        return f"budget:{tenant}:{window}:tokens", f"budget:{tenant}:{window}:messages"

    async def admit(self, tenant: str) -> None:
        """Raise :class:`BudgetExceededError` if ``tenant`` may not send another message now."""
        tokens_key, messages_key = self._keys(tenant)
        tokens_used, messages_used = (int(v or 0) for v in await self._redis.mget(tokens_key, messages_key))
        token_allowance = self._settings.token_allowance(tenant)
        message_allowance = self._settings.message_allowance(tenant)
        self._recorder.tokens(tenant, allowed=token_allowance, used=tokens_used)
        self._recorder.messages(tenant, allowed=message_allowance, used=messages_used)
        if messages_used >= message_allowance:
            self._recorder.message_overrun(tenant)
            raise BudgetExceededError(
                f"Message budget exceeded for tenant {tenant}: {messages_used} of {message_allowance} messages "
                f"used in this {self._settings.budget_window_seconds}s window."
            )
        if tokens_used >= token_allowance:
            self._recorder.token_overrun(tenant)
            raise BudgetExceededError(
                f"Token budget exceeded for tenant {tenant}: {tokens_used} of {token_allowance} tokens "
                f"used in this {self._settings.budget_window_seconds}s window."
            )

    async def charge(self, tenant: str, *, tokens: int) -> None:
        """Count one answered message and its tokens against the tenant's window."""
        tokens_key, messages_key = self._keys(tenant)
        ttl = self._settings.budget_window_seconds * 2
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(tokens_key, tokens).expire(tokens_key, ttl).incr(messages_key).expire(messages_key, ttl)
            tokens_used, _, messages_used, _ = await pipe.execute()
        self._recorder.tokens(tenant, allowed=self._settings.token_allowance(tenant), used=int(tokens_used))
        self._recorder.messages(tenant, allowed=self._settings.message_allowance(tenant), used=int(messages_used))
