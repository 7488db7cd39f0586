"""The outbox publisher: moves outbox rows to the WAL topic, then marks them sent.

A row is marked sent only after the broker acknowledged it, so a broker outage leaves
rows pending (``outbox_pending`` grows) and nothing is lost; a crash between the
acknowledgement and the mark sends a row twice, which the replicator's idempotent write
absorbs. An acknowledgement is not the end of it: a broker can lose what it acknowledged
(a restart without durable storage, an unclean leader election), so a row the replicator
has not confirmed within ``CHATPIPE_OUTBOX_REDELIVER_SECONDS`` of being sent is sent again,
with the wait doubling per send. Several publishers can run, for availability: one round at
a time among them (a transaction-level advisory lock), so no publisher sends a session's later
row while another waits for the broker to acknowledge an earlier one, and when one stops (its
connection, and so its lock, gone) another takes the next round. A round sends a batch of
rows at once, so one publisher at a time keeps up. Each record continues the trace of the
HTTP request that created the row.

A row the producer refuses for good (larger than a Kafka request may be: no retry can change
that) is parked, logged and counted in ``outbox_rows_parked_total``, so it neither blocks the
outbox nor makes the rows before it be sent again each round. Any other failure, a broker's
refusal included (it refuses a whole batch of rows, most of them innocent), ends the round:
the rows acknowledged are marked sent, except those behind a failed row of their session,
which are sent again after it.

Rows the replicator confirmed are deleted ``CHATPIPE_OUTBOX_RETENTION_SECONDS`` later (a week,
unless 0: kept for good), every ``CHATPIPE_OUTBOX_SWEEP_SECONDS``; the outbox would grow
without end otherwise. The replica (``replicated_messages``) is the messages' record, kept.

The publisher does not poll: it listens on :data:`~chatpipe.db.OUTBOX_CHANNEL`, which the
outbox's trigger notifies when a row becomes pending, and reads the outbox when told (and
at the latest every ``CHATPIPE_PUBLISHER_IDLE_SECONDS``, in case a notification was lost:
the listening connection down, say). A poll every 0.1 s was three statements ten times a
second for nothing, most of the time.

Run: ``python -m chatpipe.outbox.publisher`` (metrics on ``CHATOBS_METRICS_PORT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from opentelemetry.trace import SpanKind

import chatobs
from chatobs.propagation import continued
from chatpipe.db import OUTBOX_CHANNEL, connect_pool, migrate
from chatpipe.health import HealthProbes, kafka_metadata, postgres_ping
from chatpipe.kafka import OnceStarted, new_producer
from chatpipe.runtime import close_in_order, forever, install_stop_signals, periodic, run_service, run_until_stopped
from chatpipe.settings import PipelineSettings, load_backend_settings, load_pipeline_settings

__all__ = ["OutboxWakeup", "Publisher", "main"]

_logger = logging.getLogger("chatpipe.publisher")
#: After the listening connection fails, how long before connecting it again.
_RELISTEN_SECONDS = 5.0
#: The publishers' round lock ("outb"): one round at a time among all the publishers.
_ROUND_LOCK = 0x6F757462
#: The longest a round's transaction may sit idle (waiting on the broker) before PostgreSQL
#: ends it, and with it the round lock; aiokafka's delivery timeout is well under it.
_ROUND_IDLE_LIMIT_SECONDS = 120.0
#: The pending rows in id order. No SKIP LOCKED: skipping a row would send the rows after it first.
_CLAIM_ROWS = (
    "select id, session_id, payload, traceparent from outbox"
    " where sent_at is null and parked_at is null order by id limit $1 for update"
)


class OutboxWakeup:
    """Ends the publisher's idle pause as soon as an outbox row becomes pending.

    One connection of its own (not the pool's: it must stay open) LISTENs on
    :data:`~chatpipe.db.OUTBOX_CHANNEL`. When it cannot connect or is cut off, the pause
    simply lasts its full length, and the connection is made again a few seconds later.

    Example::

        wakeup = OutboxWakeup(database_url, stopping)
        await wakeup.pause(1.0)   # returns on a notification, after 1 s, or when stopping
        await wakeup.close()
    """

    def __init__(self, database_url: str, stopping: asyncio.Event):
        self._database_url = database_url
        self._stopping = stopping
        self._notified = asyncio.Event()
        self._connection: asyncpg.Connection | None = None
        self._listen_after = 0.0

    async def pause(self, seconds: float) -> None:
        await self._listen()
        waits = [asyncio.ensure_future(self._notified.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        # Cleared before the round that follows: a row added during that round notifies again.
        self._notified.clear()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        if (self._connection is not None and not self._connection.is_closed()) or loop.time() < self._listen_after:
            return
        self._listen_after = loop.time() + _RELISTEN_SECONDS
        connection = None
        try:
            connection = await asyncpg.connect(self._database_url, timeout=2)
            await connection.add_listener(OUTBOX_CHANNEL, self._notify)
        except Exception as error:  # noqa: BLE001 - e.g. InterfaceError: closed before LISTEN ran
            _logger.info("publisher: not listening for outbox rows (%r); reading it every round", error)
            if connection is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 2)
            return
        self._connection = connection
        self._notified.set()  # rows may have been added while nobody listened

    def _notify(self, *_: object) -> None:
        self._notified.set()

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 5)


class Publisher:
    def __init__(self, telemetry: chatobs.Telemetry, pool: asyncpg.Pool, producer: AIOKafkaProducer,
                 settings: PipelineSettings):  # fmt: skip
        self._telemetry = telemetry
        self._pool = pool
        self._producer = producer
        self._settings = settings
        self._topic = telemetry.settings.chatobs.wal_topic

    async def publish_round(self) -> bool:
        """Publish one batch of pending rows in id order; True if a full batch was published
        (more rows may be waiting), False if the outbox is drained."""
        async with self._pool.acquire() as connection, connection.transaction():
            if not await connection.fetchval("select pg_try_advisory_xact_lock($1)", _ROUND_LOCK):
                return False  # another publisher's round is on: this one waits its turn, idle
            # A statement of its own, so its snapshot is taken once the round is held: it sees what
            # the last round committed (or rolled back), and the rows still pending in id order.
            rows = await connection.fetch(_CLAIM_ROWS, self._settings.publisher_batch_size)
            if not rows:
                return False
            outcomes = await asyncio.gather(*await self._send(rows), return_exceptions=True)
            delivered, parked, held_back = _sorted_out(rows, outcomes)
            await connection.execute(
                "update outbox set sent_at = now(), deliveries = deliveries + 1 where id = any($1::bigint[])", delivered
            )
            if parked:
                await connection.executemany(
                    "update outbox set parked_at = now(), parked_reason = $2 where id = $1",
                    [(row["id"], reason) for row, reason in parked],
                )
        for row, reason in parked:
            self._telemetry.backlog.outbox_row_parked()
            _logger.error("publisher: outbox row %d (session %s) parked, too large to be sent: %s",
                          row["id"], row["session_id"], reason)  # fmt: skip
        if held_back:
            raise RuntimeError(f"{held_back} of {len(rows)} outbox rows not acknowledged")
        return len(rows) >= self._settings.publisher_batch_size

    async def _send(self, rows: list[asyncpg.Record]) -> list[asyncio.Future[object]]:
        """Each row's delivery, in order; a row ``send()`` refused at once has its error as its
        outcome, and after one it refused for a reason that may pass, nothing more is sent."""
        deliveries: list[asyncio.Future[object]] = []
        for row in rows:
            parent = continued(row["traceparent"])
            with self._telemetry.tracer.start_as_current_span("outbox publish", context=parent,
                                                              kind=SpanKind.INTERNAL):  # fmt: skip
                payload = row["payload"] if isinstance(row["payload"], str) else json.dumps(row["payload"])
                try:
                    deliveries.append(
                        await self._producer.send(self._topic, payload.encode(), key=row["session_id"].encode())
                    )
                except Exception as error:  # noqa: BLE001 - sorted out with the deliveries' failures
                    # Only the producer's own refusal, before sending, is this row's for good: the
                    # broker refuses a whole batch of rows, most of them innocent, and is retried.
                    for_good = isinstance(error, MessageSizeTooLargeError)
                    refused: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                    refused.set_exception(_RefusedForGoodError(error) if for_good else error)
                    deliveries.append(refused)
                    if not for_good:
                        break
        return deliveries

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

    async def sweep_round(self) -> int:
        """Delete the rows the replicator confirmed more than ``CHATPIPE_OUTBOX_RETENTION_SECONDS``
        ago (none when it is 0); the number deleted.

        A batch a statement, so no statement holds many row locks or runs for long, and a
        sweep cut short by its time limit has deleted whole batches. Rows never confirmed
        (pending, parked, or sent and awaiting their confirmation) are kept whatever their age.
        """
        retention = self._settings.outbox_retention_seconds
        if retention == 0:
            return 0
        batch = self._settings.publisher_batch_size
        deleted = 0
        while True:
            status = await self._pool.execute(
                "delete from outbox where id in (select id from outbox"
                " where confirmed_at < now() - make_interval(secs => $1) limit $2 for update skip locked)",
                retention, batch,
            )  # fmt: skip
            count = int(status.rsplit(" ", 1)[-1])
            deleted += count
            if count < batch:
                break
        if deleted:
            _logger.info("publisher: deleted %d outbox row(s) confirmed more than %.0f s ago", deleted, retention)
        return deleted

    async def measure_backlog(self) -> None:
        # One statement, no transaction: it runs every second. When the timeout expires (or the
        # caller's does), asyncpg cancels the statement on the server too, so a slow count
        # cannot pile up behind the next one.
        pending = await self._pool.fetchval(
            "select count(*) from outbox where sent_at is null and parked_at is null",
            timeout=self._settings.backlog_query_timeout_seconds,
        )
        self._telemetry.backlog.outbox_pending(pending)


class _RefusedForGoodError(Exception):
    """A row the producer refused before sending it (too large): no retry can change that."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.__cause__ = error


def _sorted_out(
    rows: list[asyncpg.Record], outcomes: list[object]
) -> tuple[list[int], list[tuple[asyncpg.Record, str]], int]:
    """``(ids delivered, rows refused for good and why, rows held back)`` of a round.

    A row is delivered when the broker acknowledged it and no earlier row of its session
    failed for a reason that may pass: a later row must not overtake a failed one of its
    session, so it is held back and sent again after it. A row refused for good holds back
    nothing (it will never be sent). Rows the round did not get to send are held back too.
    """
    delivered: list[int] = []
    parked: list[tuple[asyncpg.Record, str]] = []
    failed_sessions: set[str] = set()
    held_back = len(rows) - len(outcomes)
    for row, outcome in zip(rows, outcomes, strict=False):
        if row["session_id"] in failed_sessions:
            held_back += 1
        elif isinstance(outcome, _RefusedForGoodError):
            error = outcome.__cause__
            parked.append((row, f"{type(error).__name__}: {error}"[:500]))
        elif isinstance(outcome, BaseException):
            failed_sessions.add(row["session_id"])
            held_back += 1
        else:
            delivered.append(row["id"])
    return delivered, parked, held_back


async def main() -> None:
    telemetry = chatobs.setup(service="publisher")
    backends = load_backend_settings()
    settings = load_pipeline_settings()
    stopping = install_stop_signals()
    pool = await connect_pool(
        backends.database_url, max_size=settings.db_pool_size, command_timeout=settings.db_command_timeout_seconds,
        # A round holds the round lock while the broker acknowledges (seconds at most): a publisher
        # cut off mid-round must not hold up the others until TCP notices.
        idle_in_transaction_seconds=_ROUND_IDLE_LIMIT_SECONDS,
    )  # fmt: skip
    await migrate(pool)
    producer = new_producer(backends.kafka_bootstrap_servers)
    publisher = Publisher(telemetry, pool, producer, settings)
    wakeup = OutboxWakeup(backends.database_url, stopping)
    # Until the producer reaches a broker, this probe fails at once: Kafka is reported down.
    health = HealthProbes(telemetry.health, {"postgres": postgres_ping(pool),
                                             "kafka": kafka_metadata(producer)},
                          timeout=settings.health_probe_timeout_seconds)  # fmt: skip

    # The producer starts among the loops, not before them: a publisher (re)started while the
    # broker is down still measures the backlog growing, which its alert is built on.
    kafka = OnceStarted(stopping, ("producer", producer))
    _logger.info("publisher: outbox -> %s", publisher._topic)

    try:
        await run_until_stopped(
            stopping,
            kafka.then(forever("publish", publisher.publish_round, stopping, idle=settings.publisher_idle_seconds,
                               pause=wakeup.pause)),
            periodic("outbox_pending", publisher.measure_backlog, stopping, every=settings.backlog_poll_seconds,
                     timeout=settings.backlog_query_timeout_seconds,
                     on_failure=lambda: telemetry.backlog.unmeasured("outbox_pending")),
            periodic("redeliver", publisher.redeliver_round, stopping, every=settings.outbox_redeliver_seconds / 2,
                     timeout=settings.outbox_redeliver_seconds),
            periodic("outbox_retention", publisher.sweep_round, stopping, every=settings.outbox_sweep_seconds,
                     timeout=settings.outbox_sweep_seconds),
            periodic("health", health.round, stopping, every=settings.health_probe_seconds,
                     timeout=2 * settings.health_probe_timeout_seconds),
            grace=settings.shutdown_grace_seconds,
        )  # fmt: skip
    finally:
        await close_in_order(("notifications", wakeup.close), ("producer", producer.stop), ("pool", pool.close),
                             ("telemetry", telemetry.shutdown))  # fmt: skip


if __name__ == "__main__":
    run_service(main)
