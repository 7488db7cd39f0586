"""Regressions: inputs that once broke the whole scrape."""

from __future__ import annotations

import socket
import time
from decimal import Decimal

import pytest
from opentelemetry.metrics import Observation
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from chatobs import ConfigError, Telemetry, load_settings

OPENMETRICS = "application/openmetrics-text"


def build(**env: str) -> Telemetry:
    return Telemetry(load_settings(env), service="worker")


def both_formats(telemetry: Telemetry) -> tuple[str, str]:
    text = telemetry.scrape()[2].decode()
    openmetrics = telemetry.scrape(OPENMETRICS)[2].decode()
    list(parse_text(text))
    list(parse_openmetrics(openmetrics))
    return text, openmetrics


def test_decimal_bool_and_other_number_types_render_as_numbers():
    telemetry = build()
    telemetry.backlog.outbox_pending(Decimal("5"))  # type: ignore[arg-type]
    telemetry.budgets.tokens("acme", allowed=True, used=1)  # type: ignore[arg-type]
    telemetry.somabrain.context_build(Decimal("0.3"))  # type: ignore[arg-type]
    text, _ = both_formats(telemetry)
    assert "outbox_pending 5.0\n" in text
    assert 'tenant_budget_tokens_allowed{tenant="acme"} 1.0\n' in text


def test_a_lone_surrogate_in_a_label_value_is_other_not_a_failed_scrape():
    telemetry = build()
    # Rendered as UTF-8 these two would both read `gpt?`: one series twice, which Prometheus rejects.
    telemetry.llm.request("gpt\ud800", "p")
    telemetry.llm.request("gpt\ud801", "p")
    status, _, body = telemetry.scrape()
    assert status == 200
    text = body.decode()
    assert 'llm_requests_total{model="other",provider="p",mode="normal"} 2' in text
    assert 'chatobs_label_rejections_total{metric="llm_requests_total",label="model"} 2' in text


def test_a_lone_surrogate_in_a_resource_attribute_does_not_fail_the_scrape():
    telemetry = build(OTEL_RESOURCE_ATTRIBUTES="deployment.environment=dev\udc80")
    status, _, body = telemetry.scrape()
    assert status == 200
    assert 'deployment_environment="dev?"' in body.decode()


def test_one_name_from_two_meters_is_one_family():
    telemetry = build()
    telemetry.llm.request("m", "p")
    other = telemetry.meter_provider.get_meter("someone-else").create_counter("llm_requests_total")
    other.add(1, {"model": "x", "provider": "p", "mode": "normal"})
    text, openmetrics = both_formats(telemetry)
    assert text.count("# TYPE llm_requests_total counter") == 1
    assert openmetrics.count("# TYPE llm_requests counter") == 1


def test_uncatalogued_metrics_whose_names_clash_once_translated_are_left_out(caplog):
    telemetry = Telemetry(load_settings({"CHATOBS_EXPOSE_UNCATALOGUED": "true"}), service="gateway")
    meter = telemetry.meter_provider.get_meter("someone-else")
    # FastAPI's own instrument, left on: in seconds it translates to the catalogue's name.
    meter.create_histogram("http.server.request.duration", unit="s").record(0.1, {"http.route": "/x"})
    meter.create_counter("jobs.done").add(1)
    meter.create_counter("jobs_done").add(2)  # the same name once translated
    meter.create_up_down_counter("queue.depth").add(1, {"kind": "a"})
    text, _ = both_formats(telemetry)  # both parse: no family twice
    assert text.count("# TYPE http_server_request_duration_seconds histogram") == 1
    assert 'http.route="/x"' not in text and 'http_route="/x"' not in text
    assert text.count("# TYPE jobs_done_total counter") == 1
    assert "jobs_done_total 1\n" in text  # the first of the two
    assert 'queue_depth{kind="a"} 1\n' in text  # what does not clash is exposed
    telemetry.scrape()
    warnings = [r.getMessage() for r in caplog.records if "not exposed" in r.getMessage()]
    assert len(warnings) == 2, warnings  # once each, not once a scrape
    assert "'jobs_done'" in warnings[1] or "'jobs_done'" in warnings[0]


def test_uncatalogued_metrics_that_would_take_a_sample_or_openmetrics_name_are_left_out(caplog):
    """A gauge ``req_seconds_count`` beside a histogram ``req_seconds``, or an up-down counter
    ``target`` (OpenMetrics' name for ``target_info``): the strict parsers and promtool refused
    the whole scrape ("clashing name", "second TYPE line")."""
    telemetry = Telemetry(load_settings({"CHATOBS_EXPOSE_UNCATALOGUED": "true"}), service="gateway")
    meter = telemetry.meter_provider.get_meter("someone-else")
    meter.create_histogram("req", unit="s").record(0.1)
    meter.create_up_down_counter("req_seconds_count").add(3)
    meter.create_up_down_counter("target").add(1)
    meter.create_counter("queue").add(1)
    meter.create_up_down_counter("queue_total").add(5)  # a counter's family name in the text format
    meter.create_up_down_counter("llm_tokens").add(1)  # OpenMetrics' name of the catalogue's llm_tokens_total
    text, openmetrics = both_formats(telemetry)  # both parse
    assert "# TYPE req_seconds histogram" in text and "req_seconds_count 1\n" in text
    assert "req_seconds_count 3" not in text
    assert "# TYPE target gauge" not in openmetrics and "target 1" not in openmetrics
    assert "queue_total 1\n" in text and "queue_total 5" not in text
    assert "# TYPE llm_tokens gauge" not in openmetrics
    warnings = [r.getMessage() for r in caplog.records if "not exposed" in r.getMessage()]
    assert len(warnings) == 4, warnings


def test_resource_attributes_that_collide_once_sanitised_keep_one_label():
    telemetry = build(OTEL_RESOURCE_ATTRIBUTES="service_name=shadow", OTEL_SERVICE_NAME="worker-1")
    text, _ = both_formats(telemetry)
    [target] = [line for line in text.splitlines() if line.startswith("target_info{")]
    assert target.count("service_name=") == 1
    assert 'service_name="worker-1"' in target


def test_exemplars_survive_a_text_scrape_in_between():
    telemetry = build()
    with TracerProvider().get_tracer("t").start_as_current_span("turn") as span:
        telemetry.somabrain.context_build(0.2)
    trace_id = format(span.get_span_context().trace_id, "032x")
    telemetry.scrape()  # a text-format scrape collects (and used to swallow) the exemplar
    for _ in range(2):
        assert trace_id in telemetry.scrape(OPENMETRICS)[2].decode()


def test_a_collection_past_its_timeout_serves_the_previous_one():
    telemetry = build(CHATOBS_SCRAPE_TIMEOUT_SECONDS="0.2")
    state = {"value": 7, "delay": 0.0}

    def reading(options):
        time.sleep(state["delay"])
        return [Observation(state["value"])]

    telemetry.instruments.observe("outbox_pending", reading)
    assert "outbox_pending 7\n" in telemetry.scrape()[2].decode()
    state.update(value=8, delay=0.5)  # a measurement that blocks past the scrape timeout
    status, _, body = telemetry.scrape()
    assert status == 200
    assert "outbox_pending 7\n" in body.decode(), "expected the previous collection, not an error"


def test_a_collection_past_its_timeout_still_shows_the_cells_as_they_are():
    """Only the readings are the previous collection's: the cells never block, so a scrape shows
    their values now, and series recorded since, even with no good collection at all yet."""
    telemetry = build(CHATOBS_SCRAPE_TIMEOUT_SECONDS="0.2")

    def reading(options):
        time.sleep(0.5)  # past the scrape timeout, at every collection
        return [Observation(1)]

    telemetry.instruments.observe("outbox_pending", reading)
    telemetry.llm.request("sim-large", "simulator", "normal")
    first = telemetry.scrape()[2].decode()
    telemetry.llm.request("sim-small", "simulator", "normal")
    telemetry.llm.request("sim-large", "simulator", "normal")
    second = telemetry.scrape()[2].decode()
    assert 'llm_requests_total{model="sim-large",provider="simulator",mode="normal"} 1\n' in first
    assert 'llm_requests_total{model="sim-large",provider="simulator",mode="normal"} 2\n' in second
    assert 'llm_requests_total{model="sim-small",provider="simulator",mode="normal"} 1\n' in second
    assert "outbox_pending 1" not in second  # no collection came in time: no reading to show


def test_a_reading_that_fails_costs_only_its_own_metric():
    telemetry = build()
    readings = [Observation(5, {"pid": ["a", "list"]}), Observation(6, {"pid": ["a", "list"]})]
    telemetry.instruments.observe("process_open_fds", lambda options: readings)  # a valid, unhashable value
    telemetry.instruments.observe("degraded_buffer_size", lambda options: 1 / 0)
    telemetry.llm.request("sim-large", "simulator", "normal")
    body = telemetry.scrape()[2].decode()
    assert 'llm_requests_total{model="sim-large",provider="simulator",mode="normal"} 1\n' in body
    assert "\nprocess_open_fds{pid=" in body and " 6\n" in body  # one series, the last reading
    assert "\ndegraded_buffer_size " not in body


def test_a_port_in_use_is_a_config_error_naming_the_variable():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        telemetry = build(CHATOBS_METRICS_HOST="127.0.0.1")
        with pytest.raises(ConfigError) as caught:
            telemetry.serve(port=port)
    assert caught.value.variables == ("CHATOBS_METRICS_PORT",)
    telemetry.shutdown()


def test_head_and_unknown_paths_on_the_standalone_server():
    import httpx

    telemetry = build(CHATOBS_METRICS_HOST="127.0.0.1")
    server = telemetry.serve(port=0)
    try:
        head = httpx.head(server.url, timeout=5)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0
        assert httpx.get(server.url.replace("/metrics", "/nope"), timeout=5).status_code == 404
    finally:
        telemetry.shutdown()


def test_standalone_server_keeps_connections_alive_until_stopped():
    """Prometheus keeps its connection between scrapes: one connection serves them all (no
    new connection and thread per scrape), and stopping the server closes it."""
    import http.client

    telemetry = build(CHATOBS_METRICS_HOST="127.0.0.1")
    server = telemetry.serve(port=0)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(3):
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200 and b"# TYPE" in body
            assert not response.will_close, "the server closed a connection the scraper keeps"
    finally:
        telemetry.shutdown()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        connection.request("GET", "/metrics")
        connection.getresponse().read()
    connection.close()


def _raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is, and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_standalone_server_answers_pipelined_requests_in_order_and_refuses_bad_ones():
    telemetry = build(CHATOBS_METRICS_HOST="127.0.0.1")
    server = telemetry.serve(port=0)
    try:
        # Two requests in one write, the second closing: both answered, in order, then closed.
        both = _raw_exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                                          b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # fmt: skip
        first, _, rest = both.partition(b"HTTP/1.1 404")
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"# TYPE" in first and rest
        assert b"Connection: close" in rest
        assert _raw_exchange(server.port, b"this is not http\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        post = _raw_exchange(server.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                          b"Connection: close\r\n\r\n")  # fmt: skip
        assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
        huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 70_000 + b"\r\n\r\n"
        assert _raw_exchange(server.port, huge).startswith(b"HTTP/1.1 431 ")
        # HTTP/1.0 without keep-alive: answered, then closed by the server.
        old = _raw_exchange(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert old.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in old
    finally:
        telemetry.shutdown()


def test_standalone_server_closes_an_idle_connection(monkeypatch):
    import http.client

    from chatobs import server as server_module

    monkeypatch.setattr(server_module, "_IDLE_SECONDS", 0.3)
    telemetry = build(CHATOBS_METRICS_HOST="127.0.0.1")
    server = telemetry.serve(port=0)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(3):  # requests 0.2 s apart keep it open past one idle period
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
            time.sleep(0.2)
        time.sleep(0.6)  # then quiet for longer than the idle period: closed by the server
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            connection.request("GET", "/metrics")
            connection.getresponse().read()
    finally:
        connection.close()
        telemetry.shutdown()


def test_attribute_values_python_finds_equal_are_separate_series():
    # `True == 1 == 1.0`: one cached label text for all three dropped all but one of the series.
    telemetry = Telemetry(load_settings({"CHATOBS_EXPOSE_UNCATALOGUED": "true"}), service="gateway")
    jobs = telemetry.meter_provider.get_meter("someone-else").create_counter("jobs")
    try:
        jobs.add(1, {"retry": True})
        jobs.add(5, {"retry": 1})
        jobs.add(7, {"retry": 1.0})
        jobs.add(9, {"retry": "1"})
        text, _ = both_formats(telemetry)
    finally:
        telemetry.shutdown()
    lines = sorted(line for line in text.splitlines() if line.startswith("jobs_total{"))
    assert lines == ['jobs_total{retry="1"} 5', 'jobs_total{retry="1.0"} 7', 'jobs_total{retry="True"} 1'], lines


def test_shutdown_keeps_to_its_timeout_while_a_scrape_is_in_progress():
    # A scrape holds the standalone server's loop until it is done; stopping the server waited
    # for it (up to 5 s) before the flush's own budget even began.
    import contextlib
    import threading

    import httpx

    telemetry = build(CHATOBS_METRICS_HOST="127.0.0.1")
    scrape = telemetry.scrape
    entered = threading.Event()

    def slow_scrape(*args: object) -> object:
        entered.set()
        time.sleep(4.5)
        return scrape(*args)

    telemetry.scrape = slow_scrape  # type: ignore[method-assign]
    server = telemetry.serve(port=0)

    def scrape_once() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server may close the connection on its way out
            httpx.get(server.url, timeout=10)

    scraping = threading.Thread(target=scrape_once, daemon=True)
    scraping.start()
    assert entered.wait(10), "the scrape did not start"
    started = time.monotonic()
    telemetry.shutdown(timeout_millis=500)
    took = time.monotonic() - started
    assert took < 3.0, f"shutdown(timeout_millis=500) took {took:.1f} s"
    scraping.join(15)
