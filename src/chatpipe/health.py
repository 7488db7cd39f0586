"""A service's backends probed on a schedule, each answer counted in ``health_checks_total``.

The gateway answers ``/health`` when its load balancer asks. The other services have no HTTP
server to ask, so each probes its own backends every ``CHATPIPE_HEALTH_PROBE_SECONDS``: every
service's view of every backend it needs is on the dashboards (a worker that cannot reach
the broker while the publisher can is a network problem, not a broker one).

Example::

    probes = HealthProbes(telemetry.health, {"redis": redis.ping, "kafka": kafka_metadata(consumer)},
                          timeout=settings.health_probe_timeout_seconds)
    periodic("health", probes.round, stopping, every=settings.health_probe_seconds, timeout=...)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from chatobs.recorders import HealthRecorder

__all__ = ["HealthProbes", "Probe", "http_ok", "kafka_metadata", "postgres_ping"]

_logger = logging.getLogger("chatpipe.health")

#: One backend's probe: it returns when the backend answered, and raises when it did not.
Probe = Callable[[], Awaitable[object]]


class HealthProbes:
    """Probes run together, each bounded by ``timeout``; a probe that raises or runs out of
    time is ``result="fail"``. :meth:`round` itself never raises, and answers each component's
    result (the gateway's ``/health`` shows them)."""

    def __init__(self, recorder: HealthRecorder, probes: Mapping[str, Probe], *, timeout: float):
        self._recorder = recorder
        self._probes = dict(probes)
        self._timeout = timeout

    async def round(self) -> dict[str, bool]:
        """Each component's probe, run once now: ``{component: answered}``, each one counted."""
        answers = await asyncio.gather(*(self._probe(component, probe) for component, probe in self._probes.items()))
        return dict(zip(self._probes, answers, strict=True))

    async def _probe(self, component: str, probe: Probe) -> bool:
        try:
            await asyncio.wait_for(probe(), self._timeout)
            ok = True
        except Exception as error:  # noqa: BLE001 - whatever it is, the backend did not answer
            _logger.debug("health: %s did not answer (%r)", component, error)
            ok = False
        self._recorder.check(component, ok=ok)
        return ok


def postgres_ping(pool: asyncpg.Pool) -> Probe:
    """A ``select 1`` on a connection of ``pool``."""
    return lambda: pool.fetchval("select 1")


def kafka_metadata(client: AIOKafkaConsumer | AIOKafkaProducer) -> Probe:
    """The cluster's metadata, asked of the brokers (not the client's cache)."""
    if isinstance(client, AIOKafkaConsumer):
        return client.topics
    return client.client.fetch_all_metadata


def http_ok(http: httpx.AsyncClient, url: str) -> Probe:
    """A GET of ``url`` that answers 2xx."""

    async def probe() -> None:
        (await http.get(url)).raise_for_status()

    return probe
