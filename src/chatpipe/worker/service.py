"""The conversation worker: WAL record in, streamed assistant reply out.

For each user message on the WAL topic:

1. budget check (Redis): an overrun is refused with a clear message to the client; the
   message is counted as it is admitted, and given back if the turn is not answered;
2. context build: Somabrain recall, bounded by a timeout and a circuit breaker; if
   Somabrain is down, slow, or the circuit is open, the turn goes on in **degraded
   bypass**: the LLM answers without memories;
3. LLM call (streaming): tokens are relayed to the gateway's SSE over Redis pub/sub; a
   ``tool_calls`` answer is executed by the tool executor (Kafka request, Redis reply)
   and the LLM is called again with the result;
4. memory write: the turn is remembered in Somabrain, or buffered under Redis
   ``degraded:*`` keys while it is unavailable and replayed when it recovers.

A turn is answered once. When Redis or the broker is down, the turn cannot be answered
(budgets and replies go through Redis): its record is not committed and comes again once
they are back. A finished turn leaves an ``answered:<message_id>`` key in Redis, so a
record delivered twice (that retry, or the outbox sending again what a broker lost) is
not answered twice. Turns of different sessions are answered at once (up to 16); those of
one session one after another, in the order of their records, so a reply streams whole
before the next begins (each token event names the message it answers, ``reply_to``). On
SIGTERM the worker gives the turns it is streaming ``CHATPIPE_SHUTDOWN_GRACE_SECONDS`` to
finish, commits what finished, and stops; a turn cut off then is not committed, and comes
again to the next instance (the client is told, with an ``interrupted`` error event, to drop
what it streamed). A message older than ``CHATPIPE_ANSWERED_TTL_SECONDS`` is not answered:
its ``answered:`` mark may have expired, and it might be answered twice.

Run: ``python -m chatpipe.worker`` (metrics on ``CHATOBS_METRICS_PORT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

import httpx
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

import chatobs
from chatpipe.breaker import CircuitBreaker
from chatpipe.events import TOOL_ABANDONED_TTL_SECONDS, events_channel, tool_abandoned_key, tool_result_key
from chatpipe.health import HealthProbes, http_ok, kafka_metadata
from chatpipe.kafka import ConcurrentHandler, HandOver, OnceStarted, PostponedError, new_consumer, new_producer
from chatpipe.llm_client import LLMClient, LLMError
from chatpipe.runtime import close_in_order, forever, install_stop_signals, periodic, run_until_stopped
from chatpipe.settings import PipelineSettings, load_backend_settings, load_pipeline_settings
from chatpipe.tools.catalog import TOOL_SPECS
from chatpipe.worker.budgets import BudgetExceededError, Budgets

__all__ = ["Worker", "main"]

_logger = logging.getLogger("chatpipe.worker")

DEGRADED_PREFIX = "degraded:"
ANSWERED_PREFIX = "answered:"
#: Failures of the backends a turn cannot do without: the turn waits for them (its record comes again).
BACKEND_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, KafkaError, OSError, TimeoutError)
_SYSTEM_PROMPT = "You are a helpful assistant. Use the memories given when they are relevant."
_CONCURRENCY = 16
T = TypeVar("T")


#: How long a reply's mark first waits for Redis to come back, and the longest wait it doubles to.
_REDIS_RETRY_FIRST_SECONDS = 0.25
_REDIS_RETRY_LONGEST_SECONDS = 5.0
#: How long it waits in all. A consumer that does not poll for aiokafka's max_poll_interval (300 s)
#: leaves its group, and a turn waiting here holds the consumer's rewind (no poll) until it ends.
_REDIS_RETRY_FOR_SECONDS = 60.0


def _interrupted(message_id: str) -> dict[str, str]:
    """The event telling the client to drop the tokens it has of a reply: it comes again whole."""
    return {"type": "error", "error": "the assistant was interrupted; its answer comes again",
            "reason": "interrupted", "reply_to": message_id}  # fmt: skip


class _Progress:
    """How far a turn got: whether tokens went out, whether the whole reply did, and the memory
    of a reply that went out while it is neither stored in Somabrain nor kept for the replay."""

    __slots__ = ("replied", "streamed", "unkept_memory")

    def __init__(self) -> None:
        self.streamed = False
        self.replied = False
        self.unkept_memory: dict[str, Any] | None = None


class _TokenRelay:
    """Streams tokens to the client in small batches: one Redis publish per few tokens or
    50 ms, not per token (a reply is dozens of tokens; each publish is a round trip)."""

    def __init__(self, publish: Callable[[str], Awaitable[None]], *, tokens: int = 8, seconds: float = 0.05):
        self._publish = publish
        self._limit = tokens
        self._seconds = seconds
        self._pending: list[str] = []
        self._since = time.monotonic()

    async def __call__(self, text: str) -> None:
        self._pending.append(text)
        if len(self._pending) >= self._limit or time.monotonic() - self._since >= self._seconds:
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            await self._publish(text)
        self._since = time.monotonic()


class TurnPostponedError(PostponedError):
    """An earlier turn of the session failed and comes again: this one waits its turn behind it."""


class _Session:
    __slots__ = ("failed", "lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # turns holding or awaiting the lock
        self.failed = False


class _SessionTurns:
    """One turn at a time per session, in the order they ask: the turns of a session answered at
    once would stream their tokens into the one reply the chat page is writing, interleaved.
    Other sessions' turns go on meanwhile. A session's state lives while a turn holds or awaits it.

    A turn that raises (a backend is down: its record comes again) fails the turns of its
    session queued behind it, with :class:`TurnPostponedError`: they come again after it, in
    order, rather than answer before it.

    Example::

        async with sessions.turn(session_id):
            await answer(event)
    """

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}

    @contextlib.asynccontextmanager
    async def turn(self, session_id: str) -> AsyncIterator[None]:
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session()
        session.users += 1
        try:
            async with session.lock:  # FIFO; taken at once when free, so without a suspension
                if session.failed:
                    raise TurnPostponedError(f"an earlier turn of session {session_id} comes again first")
                try:
                    yield
                except BaseException:
                    session.failed = True
                    raise
        finally:
            session.users -= 1
            if session.users == 0:
                del self._sessions[session_id]


class Worker:
    def __init__(
        self,
        telemetry: chatobs.Telemetry,
        settings: PipelineSettings,
        redis: aioredis.Redis,
        http: httpx.AsyncClient,
        producer: AIOKafkaProducer,
        waits: aioredis.Redis | None = None,
    ):
        """``waits`` is the Redis client for blocking reads (tool results): its socket timeout must
        outlast ``CHATPIPE_TOOL_TIMEOUT_SECONDS``, or the read fails before the wait is over."""
        self._telemetry = telemetry
        self._settings = settings
        self._redis = redis
        self._waits = waits or redis
        self._http = http
        self._producer = producer
        self._soma = telemetry.somabrain
        self._somabrain_url = str(settings.somabrain_url).rstrip("/")
        self._breaker = CircuitBreaker(
            "somabrain",
            telemetry.somabrain,
            failure_threshold=settings.breaker_failure_threshold,
            reset_seconds=settings.breaker_reset_seconds,
        )
        self._llm = LLMClient(http, settings, telemetry.llm)
        self._budgets = Budgets(redis, settings, telemetry.budgets)
        self._slots = asyncio.Semaphore(_CONCURRENCY)
        self._sessions = _SessionTurns()
        self._stopping: asyncio.Event | None = None
        #: The turns in flight and their commits (a :class:`~chatpipe.kafka.HandOver` is attached to it).
        self.turns = ConcurrentHandler(self._handle_record, limit=_CONCURRENCY * 4, waiting="turns wait for a backend")

    # -- consuming ---------------------------------------------------------------
    async def consume_round(self, consumer: AIOKafkaConsumer) -> bool:
        """Fetch and start turns while earlier ones are answered, and commit those that finished
        (see :class:`~chatpipe.kafka.ConcurrentHandler`); True if anything was fetched or committed."""
        return await self.turns.round(consumer)

    async def consume(self, consumer: AIOKafkaConsumer, stopping: asyncio.Event) -> None:
        """Turns until ``stopping``; then those in flight finish (within the stop's grace), and are
        committed. Those still waiting for their session's turn or a slot then do not start: they
        come again to the next instance rather than be cut off by the grace halfway."""
        self._stopping = stopping
        await self.turns.consume(consumer, stopping, "consume")

    async def drain(self, consumer: AIOKafkaConsumer) -> None:
        """Let the turns in flight finish, and commit them."""
        await self.turns.drain(consumer)

    async def _handle_record(self, record: ConsumerRecord) -> None:
        """Answer one WAL record; raises (the record comes again) only when a backend is down."""
        with self._telemetry.consumer_span(record):
            received = time.perf_counter()
            await self._answer_record(record)
            # Done with (answered, or dropped for good): a record that comes again, because a
            # backend was down or the worker stopping, is timed when it is done with, once.
            self._telemetry.backlog.wal_consumed(time.perf_counter() - received)

    async def _answer_record(self, record: ConsumerRecord) -> None:
        try:
            event = json.loads(record.value)
            message_id, session_id = str(event["message_id"]), str(event["session_id"])
        except (ValueError, KeyError, TypeError):
            _logger.error("dropping malformed WAL record at offset %s", record.offset)
            return
        if event.get("role") != "user":
            return  # only user messages are answered
        accepted = _seconds(event.get("accepted_at"))
        age = 0.0 if accepted is None else time.time() - accepted
        if age > self._settings.answered_ttl_seconds:
            # Its `answered:` mark, if it had one, has expired: answering it now could answer it
            # twice, long after (a WAL replayed from the start, a row the outbox sent again).
            _logger.warning("not answering message %s: accepted %.0fs ago, past the answered marks' %ds",
                            message_id, age, self._settings.answered_ttl_seconds)  # fmt: skip
            return
        # The session's turn is taken before anything here awaits, so in the order of the records.
        async with self._sessions.turn(session_id), self._slots:
            if self._stopping is not None and self._stopping.is_set():
                raise TurnPostponedError("the worker is stopping: the turn comes again to the next instance")
            # A duplicate of this record (the same session) waited behind it: answered by then.
            if await self._redis.exists(f"{ANSWERED_PREFIX}{message_id}"):
                return  # delivered again: answered already
            progress = _Progress()
            try:
                await self.answer(event, progress)
            except asyncio.CancelledError:
                # A stop past its grace: the turn comes again to the next instance (shielded, as this
                # one is cancelled). A reply that went out whole is marked answered, or it would be
                # answered twice; one cut off halfway is dropped by the client, told so here.
                with contextlib.suppress(Exception):
                    if progress.replied:
                        await self._mark_answered(message_id)
                    elif progress.streamed:
                        await asyncio.shield(self._emit(session_id, _interrupted(message_id)))
                if progress.unkept_memory is not None:  # its write to Somabrain was cut off: the replay sends it
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._keep_for_replay(progress.unkept_memory))
                raise
            except BACKEND_DOWN:
                if not progress.replied:
                    if progress.streamed:  # the client drops the tokens it has: the answer comes again whole
                        with contextlib.suppress(Exception):
                            await self._emit(session_id, _interrupted(message_id))
                    raise  # the turn comes again once the backend is back
                # The reply went out whole: coming again would send it twice (and charge it twice).
                # What is left, its mark (below), waits for Redis instead.
                _logger.warning("turn %s: answered, then a backend failed; marking it answered once Redis is back",
                                message_id, exc_info=True)  # fmt: skip
            except Exception:
                _logger.exception("turn %s failed", message_id)
                await self._emit(session_id, {"type": "error", "error": "the assistant failed to answer"})
            if progress.replied:
                await self._until_redis_answers(lambda: self._mark_answered(message_id))
            else:
                await self._mark_answered(message_id)

    async def _until_redis_answers(self, write: Callable[[], Awaitable[object]]) -> None:
        """``write()`` again, waiting longer each time, while Redis is down, for up to
        :data:`_REDIS_RETRY_FOR_SECONDS`; raises past them or once the worker is stopping (the turn
        then comes again, and may be answered twice)."""
        delay, give_up = _REDIS_RETRY_FIRST_SECONDS, time.monotonic() + _REDIS_RETRY_FOR_SECONDS
        while True:
            try:
                await write()
                return
            except BACKEND_DOWN:
                if (self._stopping is not None and self._stopping.is_set()) or time.monotonic() > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, _REDIS_RETRY_LONGEST_SECONDS)

    async def _mark_answered(self, message_id: str) -> None:
        # Shielded: a stop cancelling the turn now must not lose the mark of an answer already sent.
        await asyncio.shield(self._redis.set(f"{ANSWERED_PREFIX}{message_id}", "1",
                                             ex=self._settings.answered_ttl_seconds))  # fmt: skip

    # -- one turn ------------------------------------------------------------------
    async def answer(self, event: dict[str, Any], progress: _Progress | None = None) -> None:
        """Answer one user message (``progress``, if given, says how far it got)."""
        progress = progress or _Progress()
        session_id, tenant = event["session_id"], event["tenant"]
        try:
            admission = await self._budgets.admit(tenant)
        except BudgetExceededError as refusal:
            await self._emit(session_id, {"type": "error", "error": str(refusal), "reason": "budget"})
            return
        try:
            with self._soma.time_context_build():
                memories = await self._recall(tenant, session_id, event["content"])
            degraded = memories is None
            messages = self._prompt(event["content"], memories or [])

            reply_to = event["message_id"]

            async def stream(text: str) -> None:
                progress.streamed = True
                await self._emit(session_id, {"type": "token", "text": text, "reply_to": reply_to})

            relay = _TokenRelay(stream)

            mode = "degraded_bypass_somabrain" if degraded else "normal"
            tokens = 0
            try:
                reply = await self._llm.complete(messages, mode=mode, tools=TOOL_SPECS, on_token=relay)
                tokens = reply.prompt_tokens + reply.completion_tokens
                if reply.tool_calls:
                    messages.append({"role": "assistant", "content": None, "tool_calls": reply.tool_calls})
                    for call in reply.tool_calls:
                        messages.append(await self._run_tool(call, session_id, tenant, mode))
                    reply = await self._llm.complete(messages, mode=mode, on_token=relay)
                    tokens += reply.prompt_tokens + reply.completion_tokens
            except LLMError as error:
                await relay.flush()
                if tokens:  # the call before the tool's result was answered: the provider bills its tokens
                    await self._budgets.charge(admission, tokens=tokens)
                await self._emit(session_id, {"type": "error", "error": f"the language model failed ({error.code})"})
                return
            await relay.flush()
            await self._budgets.charge(admission, tokens=tokens)
            emit_mode = "degraded" if degraded else "normal"
            await self._emit(session_id, {"type": "message", "content": reply.content, "mode": emit_mode,
                                          "reply_to": event["message_id"]})  # fmt: skip
            progress.replied = True
            self._soma.assistant_emitted(emit_mode)
            if degraded:
                self._soma.bypass()  # answered without Somabrain: counted once it is answered
            self._soma.event_to_response(time.time() - float(event["accepted_at"]), emit_mode)
            await self._remember(tenant, session_id, event, reply.content, degraded=degraded, progress=progress)
        finally:
            if not progress.replied:
                # Counted when admitted; a turn that failed (or waits for a backend, and comes again)
                # was not a message answered.
                await self._budgets.refund(admission)

    def _prompt(self, content: str, memories: list[dict[str, Any]]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": _SYSTEM_PROMPT}]
        if memories:
            recalled = "\n".join(f"- {memory['text']}" for memory in memories)
            messages.append({"role": "system", "content": f"Memories:\n{recalled}"})
        messages.append({"role": "user", "content": content})
        return messages

    async def _emit(self, session_id: str, event: dict[str, Any]) -> None:
        await self._redis.publish(events_channel(session_id), json.dumps(event))

    # -- Somabrain -------------------------------------------------------------------
    async def _recall(self, tenant: str, session_id: str, query: str) -> list[dict[str, Any]] | None:
        """Memories, or None when the turn must go on without Somabrain."""
        body = {"tenant": tenant, "session_id": session_id, "query": query}
        _, memories = await self._call_somabrain("/recall", body, lambda response: _memories(response.json()))
        return memories

    async def _remember(self, tenant: str, session_id: str, event: dict[str, Any], reply: str, *,
                        degraded: bool, progress: _Progress) -> None:  # fmt: skip
        memory = {"id": event["message_id"], "tenant": tenant, "session_id": session_id,
                  "text": f"user: {event['content']} | assistant: {reply}"}  # fmt: skip
        progress.unkept_memory = memory  # until stored or kept: a stop cutting this off keeps it (_handle_record)
        if degraded:
            self._soma.call("skipped")  # the turn went on without Somabrain: so does its memory write
            outcome = "unavailable"
        else:
            outcome = await self._store_memory(memory)
        if outcome == "refused":
            _logger.warning("Somabrain refused the memory of message %s; it is not kept", memory["id"])
        elif outcome == "unavailable":
            # Keep the write until Somabrain is back (replay_round). The reply went out: Redis down
            # now must not make the turn come again, so the write waits for Redis.
            await self._until_redis_answers(lambda: self._keep_for_replay(memory))
        progress.unkept_memory = None

    async def _keep_for_replay(self, memory: dict[str, Any]) -> None:
        """Keep ``memory`` in Redis for :meth:`replay_round` to send to Somabrain once it is back."""
        await self._redis.set(f"{DEGRADED_PREFIX}{memory['id']}", json.dumps(memory))

    async def _store_memory(self, memory: dict[str, Any]) -> Literal["answered", "refused", "unavailable"]:
        outcome, _ = await self._call_somabrain("/remember", memory, lambda _: True)
        return outcome

    async def _call_somabrain(
        self, path: str, body: dict[str, Any], read: Callable[[httpx.Response], T]
    ) -> tuple[Literal["answered", "refused", "unavailable"], T | None]:
        """POST ``body`` to Somabrain's ``path`` through the circuit breaker: ``("answered", what
        read makes of the answer)``; ``("refused", None)`` when Somabrain refused this request for
        good (400, 409, 413, 422: it would refuse it again); ``("unavailable", None)`` when the
        circuit is open or the call failed (timed out, another 4xx or a 5xx, unreachable, or an
        answer ``read`` cannot read).

        Every call the breaker lets through ends in ``succeeded``, ``failed`` or ``abandoned``,
        whatever goes wrong: a half-open trial that ended in none would stay in flight, and the
        breaker would let no call through again until the worker restarts. A refusal is no
        verdict on Somabrain's health (``abandoned``): a memory it rejects for good must not open
        the circuit (and degrade every turn) each time the replay offers it again, nor close it.
        """
        if not self._breaker.allow():
            self._soma.call("circuit_open")
            return "unavailable", None
        try:
            response = await self._http.post(f"{self._somabrain_url}{path}", json=body,
                                             timeout=self._settings.somabrain_timeout_seconds)  # fmt: skip
            if response.status_code in _REFUSALS:
                self._soma.call("error")
                # No verdict on Somabrain's health: a trial ends, the failure count stays as it is.
                self._breaker.abandoned()
                return "refused", None
            response.raise_for_status()
            result = read(response)
        except httpx.TimeoutException:
            self._soma.call("timeout")
            self._breaker.failed()
            return "unavailable", None
        except (httpx.HTTPError, ValueError):  # down, failing, or an answer of the wrong shape
            self._soma.call("error")
            self._breaker.failed()
            return "unavailable", None
        except Exception:
            _logger.exception("Somabrain %s failed unexpectedly; counted as a failed call", path)
            self._soma.call("error")
            self._breaker.failed()
            return "unavailable", None
        except BaseException:
            self._breaker.abandoned()  # cancelled (a stop): no verdict on Somabrain, but the trial is over
            raise
        self._soma.call("success")
        self._breaker.succeeded()
        return "answered", result

    async def replay_round(self) -> bool:
        """Replay buffered memory writes while Somabrain accepts them; True if any was replayed."""
        if not self._breaker.would_allow():
            return False  # an open circuit: no call to make, and none to count as `circuit_open`
        replayed = 0
        async for key in self._redis.scan_iter(match=f"{DEGRADED_PREFIX}*", count=100):
            raw = await self._redis.get(key)
            if raw is None:
                continue
            outcome = await self._store_memory(json.loads(raw))
            if outcome == "unavailable":
                break  # still down: try again next round
            if outcome == "refused":
                _logger.warning("Somabrain refused the buffered memory %s; it is dropped", key)
            await self._redis.delete(key)
            replayed += 1
            if replayed >= 100:
                break
        return False  # pace rounds by degraded_replay_seconds either way

    async def measure_budget_usage(self) -> None:
        """Keep the tenants' usage gauges on the current budget window (see :meth:`Budgets.measure_usage`)."""
        await self._budgets.measure_usage()

    async def measure_degraded_buffer(self) -> None:
        """Count the ``degraded:*`` keys (a SCAN of the keyspace) into ``degraded_buffer_size``.

        Raises :class:`TimeoutError` once the walk has taken most of the measurement's time limit
        (``CHATPIPE_BACKLOG_QUERY_TIMEOUT_SECONDS``), between two SCAN calls: a keyspace too large
        to walk in time is no Redis failure, so it must not end in a command cancelled in flight
        (counted in ``redis_errors_total``, as a hung Redis is by the poller's hard limit)."""
        budget = time.monotonic() + 0.8 * self._settings.backlog_query_timeout_seconds
        count, cursor = 0, 0
        while True:
            # Most of the keyspace is other keys (an `answered:` mark per message, kept a day): a
            # large COUNT walks it in fewer round trips.
            cursor, keys = await self._redis.scan(cursor, match=f"{DEGRADED_PREFIX}*", count=5000)
            count += len(keys)
            if cursor == 0:
                break
            if time.monotonic() > budget:
                raise TimeoutError("the keyspace could not be walked within the measurement's time limit")
        self._telemetry.backlog.degraded_buffer_size(count)

    # -- tools ---------------------------------------------------------------------------
    async def _run_tool(self, call: dict[str, Any], session_id: str, tenant: str, mode: str) -> dict[str, Any]:
        call_id = call.get("id") or f"call_{uuid.uuid4().hex[:12]}"
        # `mode`: a tool that calls the LLM (summarize) labels its request as the turn's own.
        request = {"call_id": call_id, "name": call["function"]["name"],
                   "arguments": call["function"].get("arguments") or "{}", "session_id": session_id,
                   "tenant": tenant, "mode": mode}  # fmt: skip
        await self._producer.send_and_wait(self._settings.tool_topic, json.dumps(request).encode(),
                                           key=session_id.encode())  # fmt: skip
        answer = await self._waits.blpop([tool_result_key(call_id)], timeout=self._settings.tool_timeout_seconds)
        if answer is None:
            content = f"tool {request['name']} did not answer in {self._settings.tool_timeout_seconds:g}s"
            try:  # the executor, behind (an outage), then skips the call rather than run it for no one
                await self._redis.set(tool_abandoned_key(call_id), "1", ex=TOOL_ABANDONED_TTL_SECONDS)
            except BACKEND_DOWN:
                _logger.info("tool call %s: not marked abandoned (Redis is down); the executor may run it", call_id)
        else:
            result = json.loads(answer[1])
            content = str(result.get("result") if result.get("ok") else f"error: {result.get('error')}")
        return {"role": "tool", "tool_call_id": call_id, "content": content}


def _seconds(value: Any) -> float | None:
    """``value`` as a number of seconds, or None for what is none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


#: Statuses that refuse the request itself, for good (malformed, conflicting, too large, invalid).
#: Other 4xx (401, 403, 404, ...) often come from in front of Somabrain (expired credentials, a
#: proxy while it restarts): sending again later may work, so they count as Somabrain unavailable.
_REFUSALS = frozenset({400, 409, 413, 422})


def _memories(answer: Any) -> list[dict[str, Any]]:
    """The memories of a recall answer, ``{"memories": [{"text": ...}, ...]}``; ``ValueError`` for
    anything else (a bare list, ``null``, memories without text), which is a failed recall."""
    memories = answer.get("memories") if isinstance(answer, dict) else None
    if not isinstance(memories, list) or not all(
        isinstance(memory, dict) and isinstance(memory.get("text"), str) for memory in memories
    ):
        raise ValueError(f"not a recall answer (a {type(answer).__name__} without a list of memories)")
    return memories


async def main() -> None:
    telemetry = chatobs.setup(service="worker")
    backends = load_backend_settings()
    settings = load_pipeline_settings().require("llm_base_url", "somabrain_url")
    stopping = install_stop_signals()
    redis = aioredis.Redis.from_url(backends.redis_url, socket_timeout=5, socket_connect_timeout=2)
    # A blocking read waits up to the tool timeout: the socket must not give up first.
    waits = aioredis.Redis.from_url(backends.redis_url, socket_timeout=settings.tool_timeout_seconds + 5,
                                    socket_connect_timeout=2)  # fmt: skip
    topic = telemetry.settings.chatobs.wal_topic
    async with httpx.AsyncClient() as http:
        producer = new_producer(backends.kafka_bootstrap_servers)
        hand_over = HandOver(grace=settings.shutdown_grace_seconds)  # a rebalance lets turns finish as a stop does
        group = settings.consumer_group("worker")
        consumer = new_consumer(topic, group, backends.kafka_bootstrap_servers, listener=hand_over)
        # Its health checks and gauges start at once; until both clients reach a broker, Kafka's
        # check fails, and no turn is taken or replayed.
        kafka = OnceStarted(stopping, ("producer", producer), (f"consumer {group}", consumer))
        worker = Worker(telemetry, settings, redis, http, producer, waits)
        hand_over.attach(worker.turns, consumer)
        health = HealthProbes(telemetry.health, {
            "redis": redis.ping, "kafka": kafka_metadata(consumer),
            "somabrain": http_ok(http, f"{str(settings.somabrain_url).rstrip('/')}/health"),
            "llm": http_ok(http, f"{str(settings.llm_base_url).rstrip('/')}/models"),
        }, timeout=settings.health_probe_timeout_seconds)  # fmt: skip
        _logger.info("worker: %s -> replies", topic)
        try:
            await run_until_stopped(
                stopping,
                kafka.then(worker.consume(consumer, stopping)),
                kafka.then(forever("replay", worker.replay_round, stopping, idle=settings.degraded_replay_seconds)),
                periodic("degraded_buffer_size", worker.measure_degraded_buffer, stopping,
                         every=settings.backlog_poll_seconds, timeout=settings.backlog_query_timeout_seconds,
                         on_failure=lambda: telemetry.backlog.unmeasured("degraded_buffer_size")),
                periodic("health", health.round, stopping, every=settings.health_probe_seconds,
                         timeout=2 * settings.health_probe_timeout_seconds),
                periodic("budget usage", worker.measure_budget_usage, stopping, every=settings.backlog_poll_seconds,
                         timeout=settings.backlog_query_timeout_seconds),
                grace=settings.shutdown_grace_seconds,
            )  # fmt: skip
        finally:
            await close_in_order(("consumer", consumer.stop), ("producer", producer.stop), ("redis", redis.aclose),
                                 ("redis", waits.aclose), ("telemetry", telemetry.shutdown))  # fmt: skip
