"""Redis (redis-py, asyncio and sync): every command measured, traced when the span would be recorded.

:class:`RedisClientInstrumentor` puts a dispatcher (:mod:`chatobs.instrumentation.dispatch`)
over each method the contrib redis instrumentation wraps: ``execute_command`` of the clients
and cluster clients, and a pipeline's ``execute`` and ``immediate_execute_command``. Each call
is one ``redis_operation_seconds{operation}`` observation and, when it raised, one
``redis_errors_total{operation}``: the operation is the command, lower case (``get``,
``lpush``), and ``pipeline`` for a pipeline of several commands (one command sent as a
pipeline is that command). A pipeline's ``WatchError`` (the watched key changed) is the
transaction's outcome, not a failure, as for the contrib span.

A blocking command (``blpop``, ``xread`` with ``BLOCK``...) waits for data to come, so only
its failures count: its duration is the wait, no work of Redis's, and would make the
latency quantiles the timeouts callers chose. A pub/sub connection's commands
(``subscribe``, ``unsubscribe``) are measured as commands; a failure to read its messages
(``get_message``) counts in ``redis_errors_total{operation="subscribe"}``.

Example::

    RedisInstrumentor().instrument(tracer_provider=telemetry.tracer_provider)  # the contrib spans
    RedisClientInstrumentor().instrument(clients=telemetry.clients, tracer_provider=telemetry.tracer_provider,
                                         traced=True)
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Collection, Iterable
from typing import Any

from chatobs.instrumentation.dispatch import (
    BackendOperation,
    ClientInstrumentor,
    FailuresOnly,
    PatchSpec,
    Wiring,
    dispatcher,
)
from chatobs.recorders.clients import BoundFailures, BoundOperation, ClientRecorder

__all__ = ["RedisClientInstrumentor"]

# (module, class, method, is a pipeline's execute, is async)
_METHODS = (
    ("redis.client", "Redis", "execute_command", False, False),
    ("redis.client", "Pipeline", "execute", True, False),
    ("redis.client", "Pipeline", "immediate_execute_command", False, False),
    ("redis.cluster", "RedisCluster", "execute_command", False, False),
    ("redis.cluster", "ClusterPipeline", "execute", True, False),
    ("redis.asyncio.client", "Redis", "execute_command", False, True),
    ("redis.asyncio.client", "Pipeline", "execute", True, True),
    ("redis.asyncio.client", "Pipeline", "immediate_execute_command", False, True),
    ("redis.asyncio.cluster", "RedisCluster", "execute_command", False, True),
    ("redis.asyncio.cluster", "ClusterPipeline", "execute", True, True),
    ("redis.client", "PubSub", "execute_command", False, False),
    ("redis.asyncio.client", "PubSub", "execute_command", False, True),
)
#: Commands that wait for data (with a timeout of the caller's): only their failures count.
_BLOCKING = frozenset({"blpop", "brpop", "blmove", "blmpop", "brpoplpush", "bzpopmin", "bzpopmax", "bzmpop"})
#: Commands that wait only when given ``BLOCK``.
_BLOCKING_WITH_OPTION = frozenset({"xread", "xreadgroup"})
#: The types of a command name (anything else is ``other``).
_NAME_TYPES = (str, bytes)


def _command_name(command: Any) -> str:
    if command.__class__ is str:
        return command.lower()
    if command.__class__ is bytes:
        return command.decode("latin-1").lower()
    return "other"


def _blocks(operation: str, args: tuple[Any, ...]) -> bool:
    if operation in _BLOCKING:
        return True
    if operation in _BLOCKING_WITH_OPTION:
        return any(_command_name(arg) == "block" for arg in args[2:] if arg.__class__ in _NAME_TYPES)
    return False


class _Command(BackendOperation):
    backend = "redis"

    def __init__(self, clients: ClientRecorder):
        super().__init__(clients)
        self._waits: dict[str, BoundFailures] = {}

    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundOperation | BoundFailures:
        command = args[1] if len(args) > 1 else None
        # Kept by the command's spelling (`"GET"`, `b"xadd"`): not lower-cased and checked for
        # blocking on every command.
        spelled = command.__class__ in _NAME_TYPES
        if spelled:
            found = self._kept.get(command)
            if found is not None:
                return found
        operation = _command_name(command)
        # A blocking command's BoundFailures records as a BoundOperation does (only failures).
        described: BoundOperation | BoundFailures
        if _blocks(operation, args):
            described = self._waits.get(operation) or self._waits.setdefault(
                operation, self._clients.bound_failures("redis", operation)
            )
        else:
            described = self._bound.get(operation) or self.bind(operation)
        # XREAD blocks or not by its arguments: named again each time.
        if spelled and operation not in _BLOCKING_WITH_OPTION:
            self.keep(command, described)
        return described


class _PipelineExecute(_Command):
    def __init__(self, clients: ClientRecorder, watch_error: type[BaseException]):
        super().__init__(clients)
        self.benign = (watch_error,)

    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundOperation:
        operation = "pipeline"
        stack = getattr(args[0], "command_stack", None)
        if isinstance(stack, list) and len(stack) == 1:
            entry = stack[0]  # (args, options), or a cluster pipeline's command with `.args`
            command_args = getattr(entry, "args", None) or (entry[0] if isinstance(entry, tuple) and entry else ())
            if command_args:
                operation = _command_name(command_args[0])
        return self._bound.get(operation) or self.bind(operation)


class RedisClientInstrumentor(ClientInstrumentor):
    """redis-py's commands and pipelines, measured into a :class:`~chatobs.recorders.ClientRecorder`
    and traced when a span would be recorded (see
    :class:`~chatobs.instrumentation.dispatch.ClientInstrumentor`)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("redis >= 4",)

    def _specs(self, wiring: Wiring) -> Iterable[PatchSpec]:
        from redis.exceptions import WatchError

        command = _Command(wiring.clients)
        pipeline = _PipelineExecute(wiring.clients, WatchError)
        for module_name, class_name, method, is_pipeline, is_async in _METHODS:
            try:
                owner = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):  # an older redis-py without cluster support
                continue
            if hasattr(owner, method):
                operation = pipeline if is_pipeline else command
                yield owner, method, dispatcher(wiring.gate, operation, sync=not is_async), True
        # A pub/sub connection's get_message: how long it took is how long messages took to come.
        # A read cancelled is a listener gone (an SSE client that left): a silent Redis makes the
        # read's own timeout return None, so a cancellation never tells of a failure of Redis's.
        clients = wiring.clients
        reads = FailuresOnly(lambda: clients.bound_failures("redis", "subscribe"), (asyncio.CancelledError,))
        for module_name, is_async in (("redis.client", False), ("redis.asyncio.client", True)):
            owner = importlib.import_module(module_name).PubSub
            yield owner, "get_message", dispatcher(wiring.gate, reads, sync=not is_async), False
