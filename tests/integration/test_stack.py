"""`chatobs stack up` as a user runs it: a real process, real servers, Ctrl-C."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import psutil
import redis
from aiokafka import AIOKafkaProducer

from tests.conftest import ROOT, clean_env


def test_stack_up_starts_three_servers_quickly_and_leaves_nothing_after_ctrl_c():
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "chatobs.cli", "stack", "up"], env=clean_env({}), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    exports = dict(re.fullmatch(r"export (\w+)=(\S+)\n", process.stdout.readline()).groups() for _ in range(3))
    elapsed = time.monotonic() - started
    assert set(exports) == {"REDIS_URL", "DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"}
    assert elapsed < 10, f"the stack took {elapsed:.1f}s to come up"
    banner = ""
    while "local stack is up" not in banner:
        banner = process.stderr.readline()
    data_dir = Path(re.search(r"data in (\S+)\)", banner).group(1))
    assert data_dir.is_dir()

    assert redis.Redis.from_url(exports["REDIS_URL"]).ping()

    async def use_postgres_and_kafka() -> None:
        connection = await asyncpg.connect(exports["DATABASE_URL"])
        assert await connection.fetchval("select 1") == 1
        await connection.close()
        producer = AIOKafkaProducer(bootstrap_servers=exports["KAFKA_BOOTSTRAP_SERVERS"])
        await producer.start()
        await producer.send_and_wait("stack-test", b"ok")
        await producer.stop()

    asyncio.run(use_postgres_and_kafka())
    children = psutil.Process(process.pid).children(recursive=True)
    assert len(children) >= 3

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {[p.pid for p in alive]}"
    assert not data_dir.exists()
