"""The tool executor: runs the tool calls the worker asks for.

Requests arrive on the ``CHATPIPE_TOOL_TOPIC`` Kafka topic; each result is pushed to the
Redis list the worker waits on. ``summarize`` calls the LLM (non-streaming), so this
service emits LLM metrics of its own next to ``tool_calls_total`` and ``tool_call_seconds``.

Run: ``python -m chatpipe.tools`` (metrics on ``CHATOBS_METRICS_PORT``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any

import httpx
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

import chatobs
from chatobs.catalogue import OVERFLOW_VALUE
from chatpipe.events import tool_abandoned_key, tool_result_key
from chatpipe.health import HealthProbes, http_ok, kafka_metadata
from chatpipe.kafka import ConcurrentHandler, HandOver, OnceStarted, new_consumer
from chatpipe.llm_client import LLMClient, LLMError
from chatpipe.runtime import close_in_order, install_stop_signals, periodic, run_until_stopped
from chatpipe.settings import PipelineSettings, load_backend_settings, load_pipeline_settings
from chatpipe.tools.catalog import TOOL_SPECS, ToolError, calculate, clock

__all__ = ["ToolExecutor", "main"]

_logger = logging.getLogger("chatpipe.tools")
_RESULT_TTL_SECONDS = 120
_CONCURRENCY = 16
#: The share of `CHATPIPE_TOOL_TIMEOUT_SECONDS` a `summarize` call may wait on the LLM; the rest sends its result.
_LLM_SHARE_OF_TOOL_TIMEOUT = 0.9
#: The tools this executor runs (those the worker offers the LLM).
_TOOLS = frozenset(spec["function"]["name"] for spec in TOOL_SPECS)
#: The `mode` label values of an LLM request (`llm_requests_total`).
_LLM_MODES = ("normal", "degraded_bypass_somabrain")
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
#: Results kept for their requests' next delivery while Redis cannot take them (oldest dropped past it).
_MOST_UNSENT = 1024


class ToolExecutor:
    def __init__(self, telemetry: chatobs.Telemetry, settings: PipelineSettings, redis: aioredis.Redis,
                 http: httpx.AsyncClient):  # fmt: skip
        self._telemetry = telemetry
        self._settings = settings
        self._redis = redis
        self._llm = LLMClient(http, settings, telemetry.llm)
        self._slots = asyncio.Semaphore(_CONCURRENCY)
        self.requests = ConcurrentHandler(self._handle, limit=50, waiting="tool results wait for Redis")
        # Per request (topic, partition, offset), its result while Redis cannot take it: the request
        # comes again and its result is sent, not the tool run (and counted, and billed) once more.
        self._unsent: OrderedDict[tuple[str, int, int], dict[str, Any]] = OrderedDict()

    async def run(self, name: str, arguments: dict[str, Any], *, mode: str = "normal") -> Any:
        if name == "calculator":
            return calculate(str(arguments.get("expression", "")))
        if name == "clock":
            return clock()
        if name == "summarize":
            text = str(arguments.get("text", ""))[:4000]
            reply = await self._llm.complete(
                [{"role": "system", "content": "Summarize in one sentence."}, {"role": "user", "content": text}],
                mode=mode,
                stream=False,
                # Within the executor's own bound, so a slow provider is a timeout the LLM metrics
                # count, not a call cancelled from outside and counted nowhere but in its requests.
                timeout=self._settings.tool_timeout_seconds * _LLM_SHARE_OF_TOOL_TIMEOUT,
            )
            return reply.content
        raise ToolError(f"unknown tool {name!r}")

    async def execute(self, request: dict[str, Any]) -> dict[str, Any]:
        name = str(request.get("name"))
        mode = request.get("mode") if request.get("mode") in _LLM_MODES else "normal"
        started = time.perf_counter()
        try:
            arguments = json.loads(request.get("arguments") or "{}")
            if not isinstance(arguments, dict):  # `"6*7"`, a list, null: as malformed as bad JSON
                raise ToolError(f"the arguments are a JSON {type(arguments).__name__}, not an object")
            result: dict[str, Any] = {"ok": True, "result": await asyncio.wait_for(
                self.run(name, arguments, mode=mode), self._settings.tool_timeout_seconds)}  # fmt: skip
            outcome = "success"
        except (ToolError, ValueError) as error:
            result, outcome = {"ok": False, "error": str(error)}, "rejected"
        except TimeoutError:
            result, outcome = {"ok": False, "error": "timed out"}, "timeout"
        except LLMError as error:  # a summary's LLM call: its own timeout is the tool's
            outcome = "timeout" if error.code == "timeout" else "error"
            result = {"ok": False, "error": f"LLMError: {error}"}
        except Exception as error:  # noqa: BLE001 - report every failure to the caller
            result, outcome = {"ok": False, "error": f"{type(error).__name__}: {error}"}, "error"
        try:
            json.dumps(result, default=str)
        except (TypeError, ValueError) as error:  # a result that cannot be sent is no success
            result, outcome = {"ok": False, "error": f"the result cannot be sent: {error}"}, "error"
        self._telemetry.tools.call(_tool_label(name), outcome, seconds=time.perf_counter() - started)
        return result

    async def execute_round(self, consumer: AIOKafkaConsumer) -> bool:
        """Fetch and start requests while earlier ones run (up to 16 at once), and commit those that
        finished (see :class:`~chatpipe.kafka.ConcurrentHandler`): each waits in a turn of its own,
        and a slow one (a ``summarize`` waiting on the LLM) must not hold up those behind it until
        the worker gives up on them. A request whose result Redis cannot take comes again, and
        its result, kept, is sent then."""
        return await self.requests.round(consumer)

    async def consume(self, consumer: AIOKafkaConsumer, stopping: asyncio.Event) -> None:
        """Requests until ``stopping``; those in flight then finish (within the stop's grace), and are committed."""
        await self.requests.consume(consumer, stopping, "tools")

    async def _handle(self, record: ConsumerRecord) -> None:
        """Execute one request and hand its result to the worker; raises if Redis cannot take it."""
        async with self._slots:
            with self._telemetry.consumer_span(record):
                try:
                    request = json.loads(record.value)
                    key = tool_result_key(str(request.get("call_id")))
                except (ValueError, AttributeError, TypeError):  # TypeError: a record without a value
                    _logger.error("dropping malformed tool request at offset %s", record.offset)
                    return
                place = (record.topic, record.partition, record.offset)
                result = self._unsent.pop(place, None)
                if result is None:
                    if await self._redis.exists(tool_abandoned_key(str(request.get("call_id")))):
                        # The worker stopped waiting for it (a backlog after an outage): running it
                        # would only spend the tool's time, and a summary's LLM tokens, on no one.
                        _logger.warning("not running the tool request at offset %s: the worker stopped waiting "
                                        "for its result", record.offset)  # fmt: skip
                        self._telemetry.tools.abandoned(_tool_label(str(request.get("name"))))
                        return
                    result = await self.execute(request)
                try:
                    async with self._redis.pipeline(transaction=True) as pipe:
                        await (
                            pipe.rpush(key, json.dumps(result, default=str)).expire(key, _RESULT_TTL_SECONDS).execute()
                        )
                except _REDIS_DOWN:
                    self._unsent[place] = result
                    if len(self._unsent) > _MOST_UNSENT:
                        self._unsent.popitem(last=False)
                    raise  # the request comes again, once Redis is back
                except Exception:  # it would fail the same way each time it came, holding up its partition
                    _logger.exception("dropping the result of the tool request at offset %s", record.offset)


def _tool_label(name: str) -> str:
    # A name the LLM made up is no tool: `other` (counted as a label turned away), not one of
    # the `tool` label's first-seen slots taken for good.
    return name if name in _TOOLS else OVERFLOW_VALUE


async def main() -> None:
    telemetry = chatobs.setup(service="tool_executor")
    backends = load_backend_settings()
    settings = load_pipeline_settings().require("llm_base_url")
    stopping = install_stop_signals()
    redis = aioredis.Redis.from_url(backends.redis_url, socket_timeout=5, socket_connect_timeout=2)
    async with httpx.AsyncClient() as http:
        hand_over = HandOver(grace=settings.shutdown_grace_seconds)
        group = settings.consumer_group("tool_executor")
        consumer = new_consumer(settings.tool_topic, group, backends.kafka_bootstrap_servers, listener=hand_over)
        # Its health checks start at once; until the consumer reaches a broker, Kafka's fails.
        kafka = OnceStarted(stopping, (f"consumer {group}", consumer))
        executor = ToolExecutor(telemetry, settings, redis, http)
        hand_over.attach(executor.requests, consumer)
        health = HealthProbes(telemetry.health, {
            "redis": redis.ping, "kafka": kafka_metadata(consumer),
            "llm": http_ok(http, f"{str(settings.llm_base_url).rstrip('/')}/models"),
        }, timeout=settings.health_probe_timeout_seconds)  # fmt: skip
        try:
            await run_until_stopped(
                stopping,
                kafka.then(executor.consume(consumer, stopping)),
                periodic("health", health.round, stopping, every=settings.health_probe_seconds,
                         timeout=2 * settings.health_probe_timeout_seconds),
                grace=settings.shutdown_grace_seconds,
            )  # fmt: skip
        finally:
            await close_in_order(
                ("consumer", consumer.stop), ("redis", redis.aclose), ("telemetry", telemetry.shutdown)
            )
