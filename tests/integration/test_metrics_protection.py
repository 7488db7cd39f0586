"""`/metrics` protected from the environment, as a deployed service and a real Prometheus see it:
a bearer token or basic auth on the app route and the standalone server, or the scrape served
only on an internal port."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid

import httpx
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from chatobs.check import check_endpoints
from chatobs.cli import main
from chatobs.settings import load_settings
from tests.conftest import PORT, clean_env, free_port
from tests.metrics_text import value

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
TOKEN = f"token-{uuid.uuid4().hex}"
PASSWORD = f"password-{uuid.uuid4().hex}"
WORKER = [sys.executable, "-m", "tests.apps.worker_main"]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def start_worker(start_service, env: dict[str, str]):
    """The worker script (no HTTP app): metrics on the standalone server only."""
    env = {"CHATOBS_METRICS_PORT": PORT, "CHATOBS_METRICS_HOST": "127.0.0.1", **env}
    service = start_service(env, command=WORKER)
    assert service.process.stdout.readline().strip() == "ready"  # it has recorded its observations
    return service


def test_bearer_token_guards_the_app_route(start_service, monkeypatch, capsys):
    service = start_service({"CHATOBS_SERVICE": "gateway", "CHATOBS_METRICS_BEARER_TOKEN": TOKEN})
    url = service.base_url + "/metrics"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                    basic("prometheus", TOKEN)):  # fmt: skip
        refused = httpx.get(url, headers=headers, timeout=5)
        assert refused.status_code == 401, headers
        assert refused.headers["www-authenticate"] == 'Bearer realm="metrics"'
        assert "# TYPE" not in refused.text
    assert httpx.head(url, timeout=5).status_code == 401
    assert httpx.post(service.base_url + "/exercise", timeout=5).status_code == 200  # the app itself is open

    ok = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}", "Accept": OPENMETRICS}, timeout=5)
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("application/openmetrics-text")
    families = {family.name: family for family in parse_openmetrics(ok.text)}
    assert families["chat_messages_in"].samples[0].value == 1
    # 4 GETs and the HEAD above, plus start_service's readiness probe.
    assert families["chatobs_scrapes_refused"].samples[0].value >= 5

    # `chatobs check` run with the service's environment sends the token, and never prints it.
    monkeypatch.setenv("CHATOBS_METRICS_BEARER_TOKEN", TOKEN)
    assert main(["check", "--quiet-missing", url]) == 0
    assert TOKEN not in capsys.readouterr().out
    assert "401" in check_endpoints([url], load_settings({}).chatobs)[0].error


def test_basic_auth_guards_the_standalone_server(start_service, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    service = start_worker(start_service, {"CHATOBS_METRICS_BASIC_AUTH_USER": "prometheus",
                                           "CHATOBS_METRICS_BASIC_AUTH_PASSWORD_FILE": str(password_file)})  # fmt: skip
    url = service.base_url + "/metrics"
    for headers in (
        {},
        basic("prometheus", "guess"),
        basic("admin", PASSWORD),
        {"Authorization": f"Bearer {PASSWORD}"},
    ):
        refused = httpx.get(url, headers=headers, timeout=5)
        assert refused.status_code == 401, headers
        assert refused.headers["www-authenticate"].startswith('Basic realm="metrics"')
        assert "llm_requests_total" not in refused.text
    assert httpx.head(url, timeout=5).status_code == 401
    ok = httpx.get(url, auth=("prometheus", PASSWORD), timeout=5)
    assert ok.status_code == 200
    assert value(ok.text, "llm_requests_total", model="sim", provider="simulator") == 2


def test_internal_port_only_leaves_the_app_path_unknown(start_service):
    port = free_port()
    service = start_service({"CHATOBS_SERVICE": "gateway", "CHATOBS_METRICS_ON_APP": "false",
                             "CHATOBS_METRICS_PORT": str(port), "CHATOBS_METRICS_HOST": "127.0.0.1"})  # fmt: skip
    on_app = httpx.get(service.base_url + "/metrics", timeout=5)
    unknown = httpx.get(service.base_url + "/no-such-path", timeout=5)
    # Like any unknown path, and the app's own former /metrics route (tests/apps/env_app.py) is gone too.
    assert on_app.status_code == unknown.status_code == 404
    assert on_app.json() == unknown.json()
    assert httpx.head(service.base_url + "/metrics", timeout=5).status_code == 404
    httpx.post(service.base_url + "/exercise", timeout=5).raise_for_status()

    internal = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert internal.status_code == 200
    text = internal.text
    assert value(text, "chat_messages_in_total", role="user", source="web") == 1
    assert value(text, "http_server_request_duration_seconds_count", http_route="/exercise") == 1
    # Probes of the app's /metrics are ordinary unknown requests now: counted, by no route.
    assert (
        value(text, "http_server_request_duration_seconds_count", http_route="", http_response_status_code="404") >= 3
    )


def test_a_malformed_secret_stops_start_up_without_printing_it():
    secret = f"leaked-{uuid.uuid4().hex}"
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "tests.apps.env_app:app", "--port", str(free_port())],
        env=clean_env({"CHATOBS_SERVICE": "gateway", "CHATOBS_METRICS_BEARER_TOKEN": f"two words {secret}"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and "CHATOBS_METRICS_BEARER_TOKEN" in result.stderr, result.stderr[-2000:]
    assert secret not in result.stderr + result.stdout


def test_prometheus_scrapes_with_credentials_and_is_refused_without(start_service, start_prometheus, tmp_path):
    token_file, password_file = tmp_path / "token", tmp_path / "password"
    token_file.write_text(TOKEN + "\n")
    password_file.write_text(PASSWORD + "\n")
    # The same files on both sides: the services read them, Prometheus sends what they hold.
    bearer = start_service({"CHATOBS_SERVICE": "gateway", "CHATOBS_METRICS_BEARER_TOKEN_FILE": str(token_file)})
    basic_env = {
        "CHATOBS_METRICS_BASIC_AUTH_USER": "prometheus",
        "CHATOBS_METRICS_BASIC_AUTH_PASSWORD_FILE": str(password_file),
    }
    basic_auth = start_worker(start_service, basic_env)

    def job(name: str, service, **auth: object) -> dict[str, object]:
        return {"job_name": name, "static_configs": [{"targets": [service.base_url.removeprefix("http://")]}], **auth}

    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            job("bearer_ok", bearer, authorization={"credentials_file": str(token_file)}),
            job("bearer_missing", bearer),
            job("basic_ok", basic_auth, basic_auth={"username": "prometheus", "password_file": str(password_file)}),
            job("basic_wrong", basic_auth, basic_auth={"username": "prometheus", "password": "not-it"}),
        ],
    }
    prometheus = start_prometheus(yaml.safe_dump(config))

    def every_job_up() -> dict[str, str] | None:
        # Until the authorised jobs read 1: one first scrape slower than the 1 s timeout (two
        # test workers on two cores) reads 0, and the next one 1.
        up = {sample["metric"]["job"]: sample["value"][1] for sample in prometheus.query("up")}
        return up if len(up) == 4 and up["bearer_ok"] == up["basic_ok"] == "1" else None

    up = prometheus.wait_for(every_job_up, what="a scrape of every job")
    assert up == {"bearer_ok": "1", "bearer_missing": "0", "basic_ok": "1", "basic_wrong": "0"}
    # The authorised jobs store the data, and show the refused scrapes of the others.
    assert prometheus.query('llm_requests_total{job="basic_ok"}')
    assert not prometheus.query('llm_requests_total{job="basic_wrong"}')
    for name in ("bearer_ok", "basic_ok"):
        prometheus.wait_for(lambda name=name: prometheus.query(f'chatobs_scrapes_refused_total{{job="{name}"}} > 0'),
                            what=f"refused scrapes counted ({name})")  # fmt: skip
