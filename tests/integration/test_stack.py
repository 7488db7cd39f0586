"""`chatobs stack up` as a user runs it: a real process, real servers, Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import asyncpg
import psutil
import pytest
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


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_stack_up_env_file_is_written_once_up_sources_and_goes_when_the_stack_stops(tmp_path, stop_signal):
    """`chatobs stack up --env-file PATH` in the background, `. PATH` from another shell."""
    env_file, log = tmp_path / "stack.env", tmp_path / "stack.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "chatobs.cli", "stack", "up", "--env-file", str(env_file)],
                                   env=clean_env({}), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not env_file.exists():
            assert process.poll() is None, f"exited with {process.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"no {env_file} after 20s: {log.read_text()}"
            time.sleep(0.1)
        # Sourced by a shell that has none of the variables, as a second terminal would.
        sourced = subprocess.run(["sh", "-c", '. "$0" && env', str(env_file)], env={"PATH": os.environ["PATH"]},
                                 capture_output=True, text=True, check=True, timeout=10)  # fmt: skip
        variables = dict(line.split("=", 1) for line in sourced.stdout.splitlines() if "=" in line)
        assert {"REDIS_URL", "DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"} <= set(variables)
        assert redis.Redis.from_url(variables["REDIS_URL"]).ping()
        assert sorted(tmp_path.iterdir()) == sorted([env_file, log]), "the temporary file was left behind"
        assert env_file.stat().st_mode & 0o077 == 0, "readable by others: DATABASE_URL may carry a password"

        process.send_signal(stop_signal)
        assert process.wait(timeout=30) == 0, log.read_text()
        assert not env_file.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_stack_up_stops_with_a_failure_status_when_one_of_its_servers_dies(tmp_path):
    """A server killed: `chatobs stack up` went on waiting, its env file naming a Redis that was
    gone, and exited 0 at the next Ctrl-C."""
    env_file = tmp_path / "stack.env"
    process = subprocess.Popen([sys.executable, "-m", "chatobs.cli", "stack", "up", "--env-file", str(env_file)],
                               env=clean_env({}), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not env_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
        children = psutil.Process(process.pid).children(recursive=True)
        (redis_server,) = [child for child in children if "redis-server" in child.name()]
        redis_server.kill()
        assert process.wait(timeout=30) == 1
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert "redis exited with -9" in stderr, stderr
    assert not env_file.exists(), "the env file still names the dead stack"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {[p.pid for p in alive]}"


def test_stack_up_whose_terminal_closes_stops_cleanly(tmp_path):
    """The terminal closed under it (its SIGHUP): the stack stopped, but writing its last words
    to the terminal that was gone failed, and it exited 1."""
    env_file = tmp_path / "stack.env"
    terminal, its_side = pty.openpty()

    def own_terminal() -> None:  # a session of its own whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen([sys.executable, "-m", "chatobs.cli", "stack", "up", "--env-file", str(env_file)],
                               env=clean_env({}), cwd=ROOT, stdin=its_side, stdout=its_side, stderr=its_side,
                               preexec_fn=own_terminal)  # fmt: skip
    os.close(its_side)
    try:
        deadline = time.monotonic() + 30
        while not env_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, f"exited with {process.returncode}"
            with contextlib.suppress(OSError):  # what it prints: read, so it never blocks writing
                os.read(terminal, 65536)
            time.sleep(0.1)
        children = psutil.Process(process.pid).children(recursive=True)
        os.close(terminal)  # the terminal goes away: SIGHUP to its session
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert not env_file.exists()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {[p.pid for p in alive]}"
