"""Per-tenant token and message budgets, kept in Redis per time window.

Allowances come from settings (``CHATPIPE_TOKEN_BUDGET``, ``CHATPIPE_TENANT_TOKEN_BUDGETS``,
and the message equivalents); usage is counted in Redis so every worker shares it.
A request is refused when the tenant has already spent its allowance; the refusal is
counted in ``tenant_budget_*_overruns_total``.

Messages are counted when they are admitted: the check and the count are one Redis script,
so turns admitted at the same moment (a worker answers many at once, and workers share the
budget) cannot all pass an allowance that has room for only some of them. A turn admitted
but then not answered (the LLM failed, a backend went down) gives its message back with
:meth:`Budgets.refund`; a refund lost to a Redis outage leaves the message counted (the
tenant loses one message of the window, never gains one).

Tokens are known only once the LLM has answered, so they are charged then, and a turn is
admitted while the tokens already charged are under the allowance: the turns in flight
when the allowance is reached can overrun it by what they spend, at most the worker's
concurrency (times the number of workers) turns' worth of tokens.

Example::

    admission = await budgets.admit("acme")  # BudgetExceededError if a budget is spent
    try:
        reply = await llm.complete(...)
    except Exception:
        await budgets.refund(admission)  # not answered: the message goes back
        raise
    await budgets.charge(admission, tokens=reply.prompt_tokens + reply.completion_tokens)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions

from chatobs.recorders import BudgetRecorder
from chatpipe.settings import PipelineSettings

__all__ = ["Admission", "BudgetExceededError", "Budgets"]

_logger = logging.getLogger("chatpipe.worker")
#: Most tenants whose usage gauges are kept current (the label admits no more by default anyway).
_MOST_TENANTS_MEASURED = 1000

#: KEYS: messages, tokens; ARGV: message allowance, token allowance, TTL. Counts the message only
#: if both budgets have room; answers ``{verdict, messages used, tokens used}``.
_ADMIT = """
local messages = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
if messages >= tonumber(ARGV[1]) then return {'messages', messages, tokens} end
if tokens >= tonumber(ARGV[2]) then return {'tokens', messages, tokens} end
messages = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'admitted', messages, tokens}
"""
#: KEYS: messages. Gives one message back (never below 0: the window's key may have expired).
_REFUND = """
local messages = tonumber(redis.call('GET', KEYS[1]) or '0')
if messages > 0 then messages = redis.call('DECR', KEYS[1]) end
return messages
"""


class BudgetExceededError(Exception):
    """The tenant's budget is spent; the message says which and how much."""


@dataclass(frozen=True)
class Admission:
    """A message admitted against its tenant's budgets. It holds the keys of the window that
    counted it, so its tokens and a refund go to that window even if a new one began meanwhile."""

    tenant: str
    tokens_key: str
    messages_key: str


class Budgets:
    def __init__(self, redis: aioredis.Redis, settings: PipelineSettings, recorder: BudgetRecorder):
        self._redis = redis
        self._settings = settings
        self._recorder = recorder
        #: Tenants this worker has admitted or refused: their usage gauges are kept current.
        self._tenants: set[str] = set()

    async def measure_usage(self) -> None:
        """Set the usage gauges of every tenant seen to its current window's counts.

        They are set when a tenant's message is admitted or charged; a tenant quiet since the
        window changed would go on showing the last window's usage (100% used, say) for ever.
        One ``MGET`` for all of them; run it on a schedule (the worker does, every
        ``CHATPIPE_BACKLOG_POLL_SECONDS``).
        """
        tenants = sorted(self._tenants)
        if not tenants:
            return
        keys = [key for tenant in tenants for key in self._keys(tenant)]
        values = await self._redis.mget(keys)
        for index, tenant in enumerate(tenants):
            tokens_used, messages_used = values[2 * index], values[2 * index + 1]
            self._recorder.tokens(tenant, allowed=self._settings.token_allowance(tenant), used=int(tokens_used or 0))
            self._recorder.messages(tenant, allowed=self._settings.message_allowance(tenant),
                                    used=int(messages_used or 0))  # fmt: skip

    def _keys(self, tenant: str) -> tuple[str, str]:
        window = int(time.time()) // self._settings.budget_window_seconds
        return f"budget:{tenant}:{window}:tokens", f"budget:{tenant}:{window}:messages"

    async def admit(self, tenant: str) -> Admission:
        """Count one message of ``tenant``, or raise :class:`BudgetExceededError` (counting nothing)
        if it may not send another now."""
        tokens_key, messages_key = self._keys(tenant)
        if tenant not in self._tenants and len(self._tenants) < _MOST_TENANTS_MEASURED:
            self._tenants.add(tenant)
        token_allowance = self._settings.token_allowance(tenant)
        message_allowance = self._settings.message_allowance(tenant)
        ttl = self._settings.budget_window_seconds * 2
        verdict, messages_used, tokens_used = await self._redis.eval(
            _ADMIT, 2, messages_key, tokens_key, message_allowance, token_allowance, ttl
        )
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict  # bytes unless decode_responses
        self._recorder.tokens(tenant, allowed=token_allowance, used=int(tokens_used))
        self._recorder.messages(tenant, allowed=message_allowance, used=int(messages_used))
        if verdict == "messages":
            self._recorder.message_overrun(tenant)
            raise BudgetExceededError(
                f"Message budget exceeded for tenant {tenant}: {messages_used} of {message_allowance} messages "
                f"used in this {self._settings.budget_window_seconds}s window."
            )
        if verdict == "tokens":
            self._recorder.token_overrun(tenant)
            raise BudgetExceededError(
                f"Token budget exceeded for tenant {tenant}: {tokens_used} of {token_allowance} tokens "
                f"used in this {self._settings.budget_window_seconds}s window."
            )
        return Admission(tenant, tokens_key, messages_key)

    async def charge(self, admission: Admission, *, tokens: int) -> None:
        """Count the tokens the admitted message's turn spent."""
        tenant = admission.tenant
        ttl = self._settings.budget_window_seconds * 2
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(admission.tokens_key, tokens).expire(admission.tokens_key, ttl).get(admission.messages_key)
            tokens_used, _, messages_used = await pipe.execute()
        self._recorder.tokens(tenant, allowed=self._settings.token_allowance(tenant), used=int(tokens_used))
        self._recorder.messages(tenant, allowed=self._settings.message_allowance(tenant), used=int(messages_used or 0))

    async def refund(self, admission: Admission) -> None:
        """Give back the message of a turn that was admitted but not answered. Never raises: with
        Redis unreachable the message stays counted (logged)."""
        try:
            messages_used = await self._redis.eval(_REFUND, 1, admission.messages_key)
        except (redis.exceptions.RedisError, OSError) as error:
            _logger.warning("message of tenant %s not given back to its budget: %r", admission.tenant, error)
            return
        tenant = admission.tenant
        self._recorder.messages(tenant, allowed=self._settings.message_allowance(tenant), used=int(messages_used))
