"""How a scrape combines worker processes (CHATOBS_MULTIPROCESS_DIR), read from the exposition.

The other workers are real files written by :class:`ProcessFile`, as a worker would write them,
under the pids of a live process (a sleeping child) and of one that has exited."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from chatobs import Telemetry
from chatobs.catalogue import LATENCY_BUCKETS
from chatobs.multiprocess import ProcessFile, series_key
from chatobs.recorders import CircuitState
from chatobs.settings import ConfigError, load_settings
from tests.metrics_text import value

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture
def live_pid() -> Iterator[int]:
    child = subprocess.Popen(["sleep", "60"])
    yield child.pid
    child.kill()
    child.wait()


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def worker_file(directory, pid: int, values: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]) -> None:
    """Write what a worker process with ``pid`` would have written."""
    file = ProcessFile(directory, server_pid=os.getppid(), pid=pid)
    for (name, labels), slots in values.items():
        offset = file.allocate(series_key(name, dict(labels)), slots=len(slots))
        for index, slot in enumerate(slots):
            file.write(offset + 8 * index, slot)
    file.close()


def scrape(telemetry: Telemetry) -> str:
    status, _, body = telemetry.scrape()
    assert status == 200
    return body.decode()


def test_counters_sum_every_worker_gauges_only_live_ones(tmp_path, live_pid, dead_pid):
    request = ("http_server_request_duration_seconds", (("http_request_method", "GET"), ("http_route", "/"),
                                                         ("http_response_status_code", "200")))  # fmt: skip
    buckets = len(LATENCY_BUCKETS) + 1
    # count, sum, then per-bucket counts: two requests of 0.07 s (bucket le=0.1)
    two_requests = [2.0, 0.14, 0.0, 2.0] + [0.0] * (buckets - 2)
    worker_file(tmp_path, live_pid, {
        ("sessions_created_total", ()): [5],
        ("sse_clients_gauge", ()): [2],
        ("circuit_state", (("component", "somabrain"),)): [0],
        request: two_requests,
    })  # fmt: skip
    worker_file(tmp_path, dead_pid, {
        ("sessions_created_total", ()): [3],
        ("sse_clients_gauge", ()): [7],  # its clients went with it
        ("circuit_state", (("component", "somabrain"),)): [2],
        request: two_requests,
    })  # fmt: skip
    telemetry = Telemetry(load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path)}), service="gateway")
    try:
        telemetry.traffic.session_created()
        telemetry.traffic.sse_client_connected()
        telemetry.somabrain.circuit_state("somabrain", CircuitState.HALF_OPEN)
        text = scrape(telemetry)
    finally:
        telemetry.shutdown()

    assert value(text, "sessions_created_total") == 5 + 3 + 1  # sum, the exited worker included
    assert value(text, "sse_clients_gauge") == 2 + 1  # live_sum
    assert value(text, "circuit_state", component="somabrain") == 1  # live_max
    labels = dict(request[1])
    assert value(text, "http_server_request_duration_seconds_count", **labels) == 4
    assert value(text, "http_server_request_duration_seconds_bucket", le="0.1", **labels) == 4
    assert value(text, "http_server_request_duration_seconds_sum", **labels) == pytest.approx(0.28)
    pids = {line.split('"')[1] for line in text.splitlines() if line.startswith("process_open_fds{")}
    assert pids == {str(os.getpid()), str(live_pid)}  # per_process: live workers only


def test_files_of_a_finished_server_are_removed_and_another_servers_ignored(tmp_path, dead_pid, live_pid):
    finished = ProcessFile(tmp_path, server_pid=dead_pid, pid=dead_pid + 1)
    finished.allocate(series_key("sessions_created_total", {}), slots=1)
    other_server = ProcessFile(tmp_path, server_pid=live_pid, pid=live_pid)
    offset = other_server.allocate(series_key("sessions_created_total", {}), slots=1)
    other_server.write(offset, 100)
    telemetry = Telemetry(load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path)}), service="gateway")
    try:
        assert value(scrape(telemetry), "sessions_created_total") == 0
    finally:
        telemetry.shutdown()
    assert not finished.path.exists()
    assert other_server.path.exists()


def test_a_restarted_server_with_the_same_pid_adds_nothing_of_the_previous_one(tmp_path, dead_pid):
    # A container's pid 1 restarted over a directory that outlived it (a Kubernetes emptyDir):
    # the same server pid, a later start time. The earlier run's worker counted 100 sessions.
    server = os.getppid()
    earlier = ProcessFile(tmp_path, server_pid=server, pid=dead_pid, server_start=1)
    offset = earlier.allocate(series_key("sessions_created_total", {}), slots=1)
    earlier.write(offset, 100)
    earlier.close()
    telemetry = Telemetry(load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path)}), service="gateway")
    try:
        telemetry.traffic.session_created()
        assert value(scrape(telemetry), "sessions_created_total") == 1
    finally:
        telemetry.shutdown()
    assert not earlier.path.exists()


def test_the_directory_must_exist_and_metric_push_and_uncatalogued_instruments_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="CHATOBS_MULTIPROCESS_DIR"):
        load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="otlp metric push is per process") as caught:
        load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path), "OTEL_METRICS_EXPORTER": "prometheus,otlp"})
    assert caught.value.variables == ("OTEL_METRICS_EXPORTER", "CHATOBS_MULTIPROCESS_DIR")  # wrong only together
    # Instruments outside the catalogue are not combined: a counter showed 3, 1, 3 as workers answered.
    with pytest.raises(ConfigError, match="outside the catalogue are per process") as caught:
        load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path), "CHATOBS_EXPOSE_UNCATALOGUED": "true"})
    assert caught.value.variables == ("CHATOBS_EXPOSE_UNCATALOGUED", "CHATOBS_MULTIPROCESS_DIR")


def test_a_worker_forked_while_locks_were_held_records_new_values_and_scrapes_them(tmp_path):
    # gunicorn --preload forks the app's process; a thread of the parent may be admitting a
    # label value, or scraping, at that moment. Held here, as that thread would hold them,
    # across the fork.
    telemetry = Telemetry(load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path)}), service="worker")
    telemetry.llm.request("first-model", "p")
    policy = telemetry.labels
    locks = [policy._lock, *(allowed._lock for allowed in policy._allowed.values()), telemetry.scrape_reader._lock]
    for lock in locks:
        lock.acquire()
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: record a value never seen, then report what its scrape shows
        try:
            telemetry.llm.request("second-model", "p")
            shown = 'model="second-model"' in scrape(telemetry)
            os.write(writing, b"shown" if shown else b"missing")
        finally:
            os._exit(0)
    for lock in locks:
        lock.release()
    os.close(writing)
    try:
        ready, _, _ = select.select([reading], [], [], 10)
        assert ready, "the forked worker hung on a lock it inherited held"
        assert os.read(reading, 16) == b"shown"  # not the parent's last collection, after a wait
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(reading)
        telemetry.shutdown()


def test_a_histogram_read_between_an_observations_writes_still_parses(tmp_path, live_pid):
    # An observation is three writes (count, sum, bucket): a scrape can read the count already
    # raised and the bucket not yet. `_count` must still equal the `+Inf` bucket.
    request = ("http_server_request_duration_seconds", (("http_request_method", "GET"), ("http_route", "/"),
                                                         ("http_response_status_code", "200")))  # fmt: skip
    buckets = len(LATENCY_BUCKETS) + 1
    halfway = [3.0, 0.21, 0.0, 2.0] + [0.0] * (buckets - 2)  # count 3, buckets holding 2
    worker_file(tmp_path, live_pid, {request: halfway})
    telemetry = Telemetry(load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path)}), service="gateway")
    try:
        status, _, body = telemetry.scrape(OPENMETRICS)
    finally:
        telemetry.shutdown()
    assert status == 200
    families = {family.name: family for family in parse_openmetrics(body.decode())}  # raises on a mismatch
    samples = {s.name: s.value for s in families["http_server_request_duration_seconds"].samples
               if s.name.endswith("_count") or s.labels.get("le") == "+Inf"}  # fmt: skip
    name = "http_server_request_duration_seconds"
    assert samples == {f"{name}_bucket": 2, f"{name}_count": 2}


def test_a_removed_directory_keeps_the_counts_instead_of_zeroing_them(tmp_path, caplog):
    directory = tmp_path / "shared"
    directory.mkdir()
    telemetry = Telemetry(load_settings({"CHATOBS_MULTIPROCESS_DIR": str(directory)}), service="gateway")
    try:
        for _ in range(42):
            telemetry.traffic.session_created()
        assert value(scrape(telemetry), "sessions_created_total") == 42
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()  # a tmpfs cleaned, a reaper, an `rm -rf` during an incident
        telemetry.traffic.session_created()
        texts = [scrape(telemetry) for _ in range(3)]
    finally:
        telemetry.shutdown()
    assert [value(text, "sessions_created_total") for text in texts] == [42] * 3, "a counter dropped: a reset"
    assert caplog.text.count("serving the previous values") == 1, "said once, not on every scrape"


def test_a_new_worker_given_a_dead_workers_pid_keeps_its_counts(tmp_path, dead_pid):
    worker_file(tmp_path, dead_pid, {("sessions_created_total", ()): [500]})
    # The pid comes round again: the new worker's file must not be the dead one's, truncated.
    # (Same pid, a later start: faked by naming the dead file with a start time of 1.)
    (dead_file,) = tmp_path.glob("*.cells")
    server, _, process = dead_file.name[: -len(".cells")].partition("-")
    dead_file.rename(tmp_path / f"{server}-{process.partition('.')[0]}.1.cells")
    reborn = ProcessFile(tmp_path, server_pid=os.getppid(), pid=dead_pid)
    reborn.close()
    telemetry = Telemetry(load_settings({"CHATOBS_MULTIPROCESS_DIR": str(tmp_path)}), service="gateway")
    try:
        telemetry.traffic.session_created()
        text = scrape(telemetry)
    finally:
        telemetry.shutdown()
    assert value(text, "sessions_created_total") == 501


def test_a_directory_gone_before_the_first_scrape_still_shows_this_process(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    telemetry = Telemetry(load_settings({"CHATOBS_MULTIPROCESS_DIR": str(directory)}), service="gateway")
    try:
        telemetry.traffic.session_created()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
        text = scrape(telemetry)  # raised: no earlier snapshot to serve
    finally:
        telemetry.shutdown()
    assert value(text, "sessions_created_total") == 1
