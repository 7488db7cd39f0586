"""The outbox publisher: moves outbox rows to the WAL topic, then marks them sent.

A row is marked sent only after the broker acknowledged it, so a broker outage leaves
rows pending (``outbox_pending`` grows) and nothing is lost; a crash between the
acknowledgement and the mark sends a row twice, which the replicator's idempotent write
absorbs. An acknowledgement is not the end of it: a broker can lose what it acknowledged
(a restart without durable storage, an unclean leader election), so a row the replicator
has not confirmed within ``CHATPIPE_OUTBOX_REDELIVER_SECONDS`` of being sent is sent again,
with the wait doubling per send. Rows are locked with ``FOR UPDATE SKIP LOCKED``, so
several publishers can run. Each record continues the trace of the HTTP request that
created the row.

Run: ``python -m chatpipe.outbox.publisher`` (metrics on ``CHATOBS_METRICS_PORT``).
"""

from __future__ import annotations

import asyncio
import json
import logging

import asyncpg
from aiokafka import AIOKafkaProducer
from opentelemetry import propagate
from opentelemetry.trace import SpanKind

import chatobs
from chatpipe.db import connect_pool, migrate
from chatpipe.kafka import start_producer
from chatpipe.runtime import forever, install_stop_signals, periodic, run_service, run_until_stopped
from chatpipe.settings import PipelineSettings, load_backend_settings, load_pipeline_settings

__all__ = ["Publisher", "main"]

_logger = logging.getLogger("chatpipe.publisher")


class Publisher:
    def __init__(self, telemetry: chatobs.Telemetry, pool: asyncpg.Pool, producer: AIOKafkaProducer,
                 settings: PipelineSettings):  # fmt: skip
        self._telemetry = telemetry
        self._pool = pool
        self._producer = producer
        self._settings = settings
        self._topic = telemetry.settings.chatobs.wal_topic

    async def publish_round(self) -> bool:
        """Publish one batch of pending rows in id order; True if there was work."""
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "select id, session_id, payload, traceparent from outbox where sent_at is null"
                " order by id limit $1 for update skip locked",
                self._settings.publisher_batch_size,
            )
            if not rows:
                return False
            deliveries = []
            for row in rows:
                parent = propagate.extract({"traceparent": row["traceparent"]}) if row["traceparent"] else None
                with self._telemetry.tracer.start_as_current_span("outbox publish", context=parent,
                                                                  kind=SpanKind.INTERNAL):  # fmt: skip
                    payload = row["payload"] if isinstance(row["payload"], str) else json.dumps(row["payload"])
                    deliveries.append(
                        await self._producer.send(self._topic, payload.encode(), key=row["session_id"].encode())
                    )
            results = await asyncio.gather(*deliveries, return_exceptions=True)
            # Mark the prefix that was delivered: a later row must not overtake a failed one.
            delivered = []
            for row, result in zip(rows, results, strict=True):
                if isinstance(result, BaseException):
                    break
                delivered.append(row["id"])
            await connection.execute(
                "update outbox set sent_at = now(), deliveries = deliveries + 1 where id = any($1::bigint[])", delivered
            )
        if len(delivered) < len(rows):
            raise RuntimeError(f"{len(rows) - len(delivered)} of {len(rows)} outbox rows not acknowledged")
        return True

    async def redeliver_round(self) -> None:
        """Make rows sent but never confirmed by the replicator pending again (they are sent again).

        The wait before a row's next send doubles per send (up to 32 times the setting), so a
        replicator that is merely down does not make the WAL fill with copies.
        """
        rows = await self._pool.fetch(
            "update outbox set sent_at = null where id in ("
            " select id from outbox where confirmed_at is null and sent_at is not null"
            " and sent_at < now() - make_interval(secs => $1 * power(2, least(deliveries - 1, 5)))"
            " order by id limit $2 for update skip locked) returning message_id",
            self._settings.outbox_redeliver_seconds,
            self._settings.publisher_batch_size,
        )
        if rows:
            _logger.warning("publisher: %d row(s) sent but never confirmed; sending them again", len(rows))

    async def measure_backlog(self) -> None:
        # Bounded by the caller's timeout and by the statement timeout on the server side.
        timeout_ms = int(self._settings.backlog_query_timeout_seconds * 1000)
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute(f"set local statement_timeout = {timeout_ms}")
            pending = await connection.fetchval("select count(*) from outbox where sent_at is null")
        self._telemetry.backlog.outbox_pending(pending)


async def main() -> None:
    telemetry = chatobs.setup(service="publisher")
    backends = load_backend_settings()
    settings = load_pipeline_settings()
    stopping = install_stop_signals()
    pool = await connect_pool(backends.database_url)
    await migrate(pool)
    producer = await start_producer(backends.kafka_bootstrap_servers, stopping)
    if producer is None:
        return
    publisher = Publisher(telemetry, pool, producer, settings)
    _logger.info("publisher: outbox -> %s", publisher._topic)
    try:
        await run_until_stopped(
            stopping,
            forever("publish", publisher.publish_round, stopping, idle=settings.publisher_idle_seconds),
            periodic("outbox_pending", publisher.measure_backlog, stopping, every=settings.backlog_poll_seconds,
                     timeout=settings.backlog_query_timeout_seconds),
            periodic("redeliver", publisher.redeliver_round, stopping, every=settings.outbox_redeliver_seconds / 2,
                     timeout=settings.outbox_redeliver_seconds),
            grace=settings.shutdown_grace_seconds,
        )  # fmt: skip
    finally:
        await asyncio.wait_for(producer.stop(), 10)
        await pool.close()
        telemetry.shutdown()


if __name__ == "__main__":
    run_service(main)
