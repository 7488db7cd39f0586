"""Service A of the cross-process trace test: publishes one record to the WAL topic inside a
span and prints that span's trace id. Configured by the environment (KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import asyncio
import os

from aiokafka import AIOKafkaProducer

import chatobs


async def main() -> None:
    telemetry = chatobs.setup(service="publisher")
    producer = AIOKafkaProducer(bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"])
    await producer.start()
    try:
        with telemetry.tracer.start_as_current_span("chat turn") as span:
            await producer.send_and_wait(os.environ["CHATOBS_WAL_TOPIC"], b"hello", key=b"session-1")
        print(format(span.get_span_context().trace_id, "032x"), flush=True)
    finally:
        await producer.stop()
    telemetry.shutdown()


asyncio.run(main())
