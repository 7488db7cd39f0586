"""The gateway under several worker processes (gunicorn -w 4, uvicorn --workers 4): every scrape,
whichever worker answers it, reports exactly the requests served by all of them, also after a
worker is killed and replaced."""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PORT
from tests.metrics_text import value

WORKERS = 4
ROUTE = {"http_route": "/v1/sessions", "http_request_method": "POST", "http_response_status_code": "201"}


def commands(port: str) -> dict[str, list[str]]:
    return {
        "uvicorn": [sys.executable, "-m", "uvicorn", "chatpipe.gateway:app", "--workers", str(WORKERS),
                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        "gunicorn": [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", str(WORKERS),
                     "-b", f"127.0.0.1:{port}", "--log-level", "warning", "chatpipe.gateway:app"],
        # The app (and its telemetry) built once in the arbiter, then forked into the workers.
        "gunicorn --preload": [sys.executable, "-m", "gunicorn", "--preload", "-k", "uvicorn.workers.UvicornWorker",
                               "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                               "chatpipe.gateway:app"],
    }  # fmt: skip


def scrape(base: str) -> str:
    # A new connection per scrape, so the kernel hands scrapes to different workers.
    response = httpx.get(f"{base}/metrics", timeout=5, headers={"Connection": "close"})
    response.raise_for_status()
    return response.text


def worker_pids(text: str) -> set[int]:
    return {
        int(sample.labels["pid"])
        for family in text_string_to_metric_families(text)
        if family.name == "process_resident_memory_bytes"
        for sample in family.samples
    }


def wait_for_workers(base: str, server: psutil.Process, gone: int = 0, timeout: float = 60) -> set[int]:
    """Until the scrape lists exactly the server's live worker processes, all answering."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = {child.pid for child in server.children() if child.status() != psutil.STATUS_ZOMBIE}
            pids = worker_pids(scrape(base))
            # uvicorn's supervisor also runs multiprocessing's resource tracker: not a worker.
            if len(pids) == WORKERS and pids <= children and gone not in pids:
                return pids
        except (httpx.HTTPError, psutil.Error):
            pass
        time.sleep(0.3)
    raise AssertionError(f"workers not all up after {timeout}s")


def create_sessions(base: str, count: int) -> None:
    for index in range(count):
        response = httpx.post(
            f"{base}/v1/sessions", headers={"X-Tenant-ID": f"mp{index % 3}", "Connection": "close"}, timeout=10
        )
        assert response.status_code == 201, response.text


def assert_every_scrape_counts(base: str, expected: int, scrapes: int = 12) -> None:
    for _ in range(scrapes):
        text = scrape(base)
        assert value(text, "sessions_created_total") == expected
        assert value(text, "http_server_request_duration_seconds_count", **ROUTE) == expected
        assert value(text, "http_server_request_duration_seconds_bucket", le="+Inf", **ROUTE) == expected


@pytest.mark.slow
@pytest.mark.parametrize("server_kind", ["uvicorn", "gunicorn", "gunicorn --preload"])
def test_every_scrape_counts_every_workers_requests(server_kind, stack, tmp_path, start_service):
    shared = tmp_path / "multiprocess"
    shared.mkdir()
    env = {
        **stack,
        "CHATOBS_MULTIPROCESS_DIR": str(shared),
        "CHATOBS_DATA_DIR": str(tmp_path),
        "CHATPIPE_ATTACHMENT_DIR": str(tmp_path / "attachments"),
        "OTEL_SERVICE_NAME": "gateway",
    }
    service = start_service(env, command=commands(PORT)[server_kind])
    base = service.base_url
    server = psutil.Process(service.process.pid)
    first_workers = wait_for_workers(base, server)
    assert len(first_workers) == WORKERS

    create_sessions(base, 120)
    assert_every_scrape_counts(base, 120)

    # A worker dies without any chance to flush (SIGKILL); the server replaces it.
    victim = min(first_workers)
    os.kill(victim, signal.SIGKILL)
    later_workers = wait_for_workers(base, server, gone=victim)
    assert len(later_workers) == WORKERS
    assert_every_scrape_counts(base, 120)

    create_sessions(base, 40)
    assert_every_scrape_counts(base, 160)
