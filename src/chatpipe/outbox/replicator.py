"""The memory replicator: consumes the WAL and writes each message to PostgreSQL once.

The write is idempotent (``on conflict do nothing`` on ``message_id``) and the offset is
committed after the write, so a redelivered record is stored once and none is skipped:
when PostgreSQL is down the batch is rolled back and the consumer rewound to it. Each
write also confirms the message's outbox row, so the publisher knows it arrived (and
sends again what a broker lost).

Run: ``python -m chatpipe.outbox.replicator`` (metrics on ``CHATOBS_METRICS_PORT``).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer

import chatobs
from chatpipe.db import connect_pool, migrate
from chatpipe.health import HealthProbes, kafka_metadata, postgres_ping
from chatpipe.kafka import OnceStarted, commit_handled, new_consumer
from chatpipe.runtime import close_in_order, forever, install_stop_signals, periodic, run_service, run_until_stopped
from chatpipe.settings import load_backend_settings, load_pipeline_settings

__all__ = ["Replicator", "main"]

_logger = logging.getLogger("chatpipe.replicator")

INSERT = (
    "insert into replicated_messages (message_id, session_id, tenant, role, content, accepted_at)"
    " values ($1, $2, $3, $4, $5, $6) on conflict (message_id) do nothing"
)
CONFIRM = "update outbox set confirmed_at = now() where message_id = any($1::text[]) and confirmed_at is null"


class Replicator:
    def __init__(self, telemetry: chatobs.Telemetry, pool: asyncpg.Pool, consumer: AIOKafkaConsumer):
        self._telemetry = telemetry
        self._pool = pool
        self._consumer = consumer

    async def replicate_round(self) -> bool:
        batches = await self._consumer.getmany(timeout_ms=500, max_records=200)
        records = [record for batch in batches.values() for record in batch]
        if not records:
            return False
        received = time.perf_counter()
        spans = []  # each record's span context, for its exemplar once the batch is committed
        try:
            # One transaction per batch: all of it is stored and confirmed, or none (and it comes again).
            async with self._pool.acquire() as connection, connection.transaction():
                stored = []
                for record in records:
                    with self._telemetry.consumer_span(record) as span:
                        spans.append(span.get_span_context())
                        try:
                            event = json.loads(record.value)
                            values = (event["message_id"], event["session_id"], event["tenant"], event["role"],
                                      event["content"], datetime.fromtimestamp(event["accepted_at"], UTC))  # fmt: skip
                        except (ValueError, KeyError, TypeError, OverflowError):
                            _logger.error("skipping malformed WAL record at offset %s", record.offset)
                            continue
                        await connection.execute(INSERT, *values)
                        stored.append(values[0])
                await connection.execute(CONFIRM, stored)
        except Exception as error:  # noqa: BLE001 - whatever failed, the batch must come again
            _logger.warning("replicate: a batch of %d was not stored (%s); it comes again", len(records), error)
            await commit_handled(self._consumer, batches, failed=records)  # raises RecordsPostponedError
        await commit_handled(self._consumer, batches)
        # Received to committed, as the metric says: the batch's records are stored, confirmed and
        # committed together, so each took the batch's time (its exemplar, the record's trace).
        seconds = time.perf_counter() - received
        for span in spans:
            self._telemetry.backlog.wal_consumed(seconds, span=span)
        return True


async def main() -> None:
    telemetry = chatobs.setup(service="replicator")
    backends = load_backend_settings()
    settings = load_pipeline_settings()
    stopping = install_stop_signals()
    pool = await connect_pool(
        backends.database_url, max_size=settings.db_pool_size, command_timeout=settings.db_command_timeout_seconds
    )
    await migrate(pool)
    topic = telemetry.settings.chatobs.wal_topic
    group = settings.consumer_group("replicator")
    consumer = new_consumer(topic, group, backends.kafka_bootstrap_servers)
    # Its health checks start at once; until the consumer reaches a broker, Kafka's fails.
    kafka = OnceStarted(stopping, (f"consumer {group}", consumer))
    try:
        replicator = Replicator(telemetry, pool, consumer)
        health = HealthProbes(telemetry.health, {"postgres": postgres_ping(pool),
                                                 "kafka": kafka_metadata(consumer)},
                              timeout=settings.health_probe_timeout_seconds)  # fmt: skip
        await run_until_stopped(stopping,
                                kafka.then(forever("replicate", replicator.replicate_round, stopping, idle=0.05)),
                                periodic("health", health.round, stopping, every=settings.health_probe_seconds,
                                         timeout=2 * settings.health_probe_timeout_seconds),
                                grace=settings.shutdown_grace_seconds)  # fmt: skip
    finally:
        await close_in_order(("consumer", consumer.stop), ("pool", pool.close), ("telemetry", telemetry.shutdown))


if __name__ == "__main__":
    run_service(main)
