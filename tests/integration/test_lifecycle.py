"""Bootstrap and shutdown as a deployed service sees them: real processes, real sockets."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.trace import SpanContext, TraceFlags

from chatobs import Telemetry, catalogue
from chatobs.cli import main
from chatobs.settings import load_settings
from tests.conftest import ROOT, clean_env, free_port, wait_for
from tests.otlp_receiver import OtlpReceiver


@pytest.fixture
def receiver():
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def start_worker(env: dict[str, str]) -> subprocess.Popen[str]:
    """Start the worker script and wait until it has recorded (it prints `ready`)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.worker_main"],
        env=clean_env(env),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise AssertionError(f"worker did not start: {line!r}\n{process.communicate()[1][-3000:]}")
    return process


def test_standalone_server_and_setup_twice_is_harmless():
    port = free_port()
    process = start_worker({"CHATOBS_METRICS_PORT": str(port), "CHATOBS_METRICS_HOST": "127.0.0.1"})
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(url, process)
        text = httpx.get(url, timeout=5).text
        assert text.count("# TYPE llm_requests_total counter") == 1
        assert 'llm_requests_total{model="sim",provider="simulator",mode="normal"} 2' in text
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


_SET_UP_AGAIN = """
import json, sys, httpx, chatobs
from prometheus_client.parser import text_string_to_metric_families as parse

def calls(telemetry):
    return sum(sample.value for family in parse(telemetry.scrape()[2].decode()) for sample in family.samples
               if sample.name == "http_client_request_duration_seconds_count")

original = vars(httpx.HTTPTransport)["handle_request"]
first = chatobs.setup(service="worker")
httpx.get(sys.argv[1])
first.shutdown()  # an app's lifespan ends; another starts in the same process
again = first.instrument()
second = chatobs.setup(service="worker")
httpx.get(sys.argv[1])
httpx.get(sys.argv[1])
counts = [calls(first), calls(second)]
second.shutdown()
print(json.dumps({"instrumented again": again, "a new handle": second is not first, "counts": counts,
                  "httpx restored": vars(httpx.HTTPTransport)["handle_request"] is original}))
"""


def test_setup_after_shutdown_gives_a_new_handle_and_a_shut_down_one_instruments_nothing():
    """A shut-down handle instrumented the libraries again, and its shutdown, done already, never
    undid it: every later handle was refused them and measured nothing; ``setup()`` after the
    shutdown (a second lifespan in one process) returned that same dead handle."""

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        outcome, stderr = _outcome_of(_SET_UP_AGAIN, f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
        server.server_close()
    assert outcome == {"instrumented again": [], "a new handle": True, "counts": [1, 2], "httpx restored": True}, (
        outcome,
        stderr[-2000:],
    )
    assert "instrument() on a worker handle that was shut down" in stderr


def _outcome_of(script: str, *args: str) -> tuple[object, str]:
    """Run ``script`` in a fresh interpreter: the JSON its last line prints, and its stderr."""
    done = subprocess.run([sys.executable, "-c", script, *args], env=clean_env({}), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


_SECOND_LIFESPAN = """
import json, chatobs
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families as parse

app = FastAPI()

@app.get("/hi")
def hi():
    return {}

def requests_counted(text):
    return sum(sample.value for family in parse(text) for sample in family.samples
               if sample.name == "http_server_request_duration_seconds_count" and sample.labels["http_route"] == "/hi")

counted = []
for lifespan in range(2):
    telemetry = chatobs.setup(service="gateway", app=app)  # in the app's lifespan, say
    with TestClient(app) as client:
        for _ in range(lifespan + 1):
            client.get("/hi")
        counted.append(requests_counted(client.get("/metrics").text))
    telemetry.shutdown()
print(json.dumps(counted))
"""


def test_an_app_set_up_again_after_its_handles_shutdown_is_measured_by_the_new_handle():
    """A second lifespan of one app in one process: its requests went on being recorded into the
    first handle, which had shut down, and the new handle's ``/metrics`` showed none of them."""
    counted, stderr = _outcome_of(_SECOND_LIFESPAN)
    assert counted == [1, 2], (counted, stderr[-2000:])


def test_shutdown_flushes_otlp_push_with_the_same_names_and_buckets(receiver):
    port = free_port()
    process = start_worker(
        {
            "CHATOBS_METRICS_PORT": str(port),
            "OTEL_METRICS_EXPORTER": "prometheus,otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "3600000",  # never during the test: only shutdown can push
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        }
    )
    wait_for(f"http://127.0.0.1:{port}/metrics", process)
    assert not receiver.received.is_set()
    process.terminate()
    process.wait(timeout=20)
    assert receiver.received.wait(5), "shutdown did not flush the OTLP exporter"
    pushed = receiver.metrics()
    requests = pushed["llm_requests_total"]
    assert sum(point.as_int for point in requests.sum.data_points) == 2
    assert receiver.resource_attributes()["deployment.environment"] == "test"
    assert receiver.resource_attributes()["service.name"] == "worker"
    cpu = pushed["process_cpu_seconds_total"]
    assert cpu.sum.is_monotonic
    # What a collector would expose (add_metric_suffixes: false) is the catalogue's names, unchanged.
    assert set(pushed) <= {metric.name for metric in catalogue.CATALOGUE}
    [point] = pushed["llm_latency_seconds"].histogram.data_points
    assert list(point.explicit_bounds) == list(catalogue.LATENCY_BUCKETS)
    assert point.count == 1


def test_the_generic_otlp_endpoint_gets_each_signal_path_after_its_own_path_and_before_its_query(receiver):
    # Hosted collectors take a path prefix (`/otlp`) and sometimes a key in the query.
    settings = load_settings({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_TRACES_EXPORTER": "otlp",
                              "OTEL_EXPORTER_OTLP_ENDPOINT": f"{receiver.endpoint}/otlp/?tenant=acme"})  # fmt: skip
    telemetry = Telemetry(settings, service="worker")
    with telemetry.tracer.start_as_current_span("turn"):
        telemetry.llm.request("sim", "simulator")
    telemetry.shutdown()
    assert sorted(set(receiver.paths)) == ["/otlp/v1/metrics?tenant=acme", "/otlp/v1/traces?tenant=acme"]
    assert receiver.spans_by_service() == {"worker": 1}


def test_a_smaller_span_queue_alone_is_enough_and_its_batches_fit_it(receiver):
    # The batch size's default (512) must follow the queue down, not refuse the start.
    settings = load_settings({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                              "OTEL_BSP_MAX_QUEUE_SIZE": "8"})  # fmt: skip
    telemetry = Telemetry(settings, service="worker")
    for _ in range(8):
        telemetry.tracer.start_span("turn").end()
    telemetry.shutdown()
    assert receiver.spans_by_service() == {"worker": 8}
    batches = [sum(len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans)
               for request in receiver.trace_requests]  # fmt: skip
    assert batches and max(batches) <= 8


def test_unreachable_otlp_endpoint_does_not_block_scrapes():
    port = free_port()
    process = start_worker(
        {
            "CHATOBS_METRICS_PORT": str(port),
            "OTEL_METRICS_EXPORTER": "prometheus,otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
        }
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(url, process)
        for _ in range(5):
            assert httpx.get(url, timeout=1).status_code == 200
    finally:
        process.kill()
        process.wait(timeout=10)


def test_zero_code_path_gives_the_same_metrics_route(start_service):
    port = free_port()
    command = [
        str(ROOT / ".venv/bin/opentelemetry-instrument")
        if (ROOT / ".venv/bin").exists()
        else "opentelemetry-instrument",
        sys.executable,
        "-m",
        "uvicorn",
        "tests.apps.plain_app:app",
        "--port",
        str(port),
    ]
    service = start_service(
        {"CHATOBS_SERVICE": "gateway", "OTEL_PYTHON_DISTRO": "chatobs", "OTEL_PYTHON_CONFIGURATOR": "chatobs"},
        command=command,
        port=port,
    )
    assert httpx.get(service.base_url + "/hello", timeout=5).json() == {"hello": "world"}
    text = service.scrape().text
    for metric in catalogue.for_service("gateway"):
        assert f"# TYPE {metric.name} {metric.prometheus_type}\n" in text
    service.process.terminate()
    log = service.process.communicate(timeout=20)[1]
    # It was warned that nothing served /metrics, while the app it served was being scraped.
    assert "nothing serves /metrics" not in log, log[-2000:]


def test_zero_code_path_stops_the_service_on_a_bad_setting():
    # opentelemetry-instrument catches the configurator's exception and ran the app anyway,
    # with no telemetry and no /metrics.
    instrument = ROOT / ".venv/bin/opentelemetry-instrument"
    command = [str(instrument) if instrument.exists() else "opentelemetry-instrument",
               sys.executable, "-c", "print('the app ran')"]  # fmt: skip
    env = clean_env({"CHATOBS_SERVICE": "worker", "CHATOBS_METRICS_PORT": "abc",
                     "OTEL_PYTHON_DISTRO": "chatobs", "OTEL_PYTHON_CONFIGURATOR": "chatobs"})  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "the app ran" not in done.stdout
    assert "CHATOBS_METRICS_PORT='abc'" in done.stderr


def test_check_passes_a_conforming_endpoint(start_service, capsys):
    service = start_service({"CHATOBS_SERVICE": "worker"})
    httpx.post(service.base_url + "/exercise", timeout=10).raise_for_status()
    assert main(["check", "--quiet-missing", service.base_url + "/metrics"]) == 0, capsys.readouterr().out


BAD_EXPOSITION = """\
# HELP llm_latency_seconds LLM call duration.
# TYPE llm_latency_seconds histogram
llm_latency_seconds_bucket{model="m",provider="p",mode="warp",le="1.0"} 1
llm_latency_seconds_bucket{model="m",provider="p",mode="warp",le="+Inf"} 1
llm_latency_seconds_count{model="m",provider="p",mode="warp"} 1
llm_latency_seconds_sum{model="m",provider="p",mode="warp"} 0.5
# HELP somabrain_calls_total Somabrain calls.
# TYPE somabrain_calls_total gauge
somabrain_calls_total{result="success",pod="a"} 1
# HELP http_requests_total Not ours.
# TYPE http_requests_total counter
http_requests_total 3
"""


@pytest.fixture
def bad_endpoint():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = BAD_EXPOSITION.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()


def test_check_reports_each_violation_and_fails(bad_endpoint, capsys):
    assert main(["check", "--quiet-missing", bad_endpoint]) == 1
    out = " ".join(capsys.readouterr().out.split())
    for expected in (
        "buckets",
        "warp",
        "TYPE gauge, catalogue says counter",
        "pod",
        "not in the catalogue",
        "violation(s)",
    ):
        assert expected in out, expected


def test_check_fails_on_an_unreachable_endpoint(capsys):
    assert main(["check", f"http://127.0.0.1:{free_port()}/metrics"]) == 1
    assert "scrape failed" in " ".join(capsys.readouterr().out.split())


def test_a_gateway_whose_metrics_port_is_its_own_port_stops_at_start_naming_both():
    # The app import would start the metrics server there first, and uvicorn then fail to bind.
    port = str(free_port())
    env = clean_env({"CHATPIPE_GATEWAY_HOST": "127.0.0.1", "CHATPIPE_GATEWAY_PORT": port,
                     "CHATOBS_METRICS_PORT": port})  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "chatpipe.gateway"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"CHATPIPE_GATEWAY_PORT, CHATOBS_METRICS_PORT: both {port}" in last, done.stderr[-2000:]


def test_a_gateway_and_its_metrics_server_on_one_port_of_two_address_families_both_serve(stack, start_service):
    # An IPv4 and an IPv6 listener do not clash (both set IPV6_V6ONLY): the port check must not refuse this.
    port = free_port()
    env = {**stack, "CHATPIPE_GATEWAY_HOST": "0.0.0.0", "CHATPIPE_GATEWAY_PORT": str(port),
           "CHATOBS_METRICS_HOST": "::1", "CHATOBS_METRICS_PORT": str(port)}  # fmt: skip
    gateway = start_service(env, command=[sys.executable, "-m", "chatpipe.gateway"], port=port, ready_path="/health")
    for scrape in (gateway.scrape(), httpx.get(f"http://[::1]:{port}/metrics", timeout=10)):
        assert scrape.status_code == 200
        assert 'service_name="gateway"' in scrape.text


def test_an_exemplar_whose_ids_are_no_ints_is_left_out_of_the_otlp_push(receiver):
    # The API takes a float id and calls its span valid; the OTLP encoder cannot take one, and the
    # whole push (every metric of it) failed each interval until a newer exemplar replaced it.
    settings = load_settings({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    telemetry = Telemetry(settings, service="replicator")
    odd = SpanContext(trace_id=1.5, span_id=1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))  # type: ignore[arg-type]
    telemetry.backlog.wal_consumed(0.3, span=odd)
    telemetry.llm.request("sim", "simulator")
    telemetry.shutdown()
    pushed = receiver.metrics()
    [point] = pushed["wal_consume_seconds"].histogram.data_points
    assert point.count == 1 and not point.exemplars
    assert pushed["llm_requests_total"].sum.data_points[0].as_int == 1
