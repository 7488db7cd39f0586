"""Scrape protection: its settings, and the credential check both metrics servers use."""

from __future__ import annotations

import asyncio
import base64
import os
import threading

import httpx
import pytest
from starlette.applications import Starlette

from chatobs.server import MetricsAuth, MetricsServer, mount_metrics_route
from chatobs.settings import ConfigError, load_settings, settings_table

SECRET = "s3cr3t-Token_value"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(SECRET + "\n")  # a trailing newline, as `echo` writes it: stripped, as Prometheus does
    return path


@pytest.mark.parametrize(
    ("env", "variables"),
    [
        ({"CHATOBS_METRICS_BEARER_TOKEN": ""}, ("CHATOBS_METRICS_BEARER_TOKEN",)),
        ({"CHATOBS_METRICS_BEARER_TOKEN": f"two {SECRET}"}, ("CHATOBS_METRICS_BEARER_TOKEN",)),
        ({"CHATOBS_METRICS_BEARER_TOKEN_FILE": "/no/such/file"}, ("CHATOBS_METRICS_BEARER_TOKEN_FILE",)),
        (
            {"CHATOBS_METRICS_BEARER_TOKEN": SECRET, "CHATOBS_METRICS_BEARER_TOKEN_FILE": "{token_file}"},
            ("CHATOBS_METRICS_BEARER_TOKEN", "CHATOBS_METRICS_BEARER_TOKEN_FILE"),
        ),
        (
            {
                "CHATOBS_METRICS_BEARER_TOKEN": SECRET,
                "CHATOBS_METRICS_BASIC_AUTH_USER": "prometheus",
                "CHATOBS_METRICS_BASIC_AUTH_PASSWORD": SECRET,
            },
            ("CHATOBS_METRICS_BEARER_TOKEN", "CHATOBS_METRICS_BASIC_AUTH_USER", "CHATOBS_METRICS_BASIC_AUTH_PASSWORD"),
        ),
        ({"CHATOBS_METRICS_BASIC_AUTH_USER": "prometheus"}, ("CHATOBS_METRICS_BASIC_AUTH_USER",)),
        ({"CHATOBS_METRICS_BASIC_AUTH_PASSWORD": SECRET}, ("CHATOBS_METRICS_BASIC_AUTH_PASSWORD",)),
        (
            {"CHATOBS_METRICS_BASIC_AUTH_USER": "prom:etheus", "CHATOBS_METRICS_BASIC_AUTH_PASSWORD": SECRET},
            ("CHATOBS_METRICS_BASIC_AUTH_USER",),
        ),
        (
            {"CHATOBS_METRICS_BASIC_AUTH_USER": "prometheus", "CHATOBS_METRICS_BASIC_AUTH_PASSWORD": f"{SECRET}\n"},
            ("CHATOBS_METRICS_BASIC_AUTH_PASSWORD",),
        ),
        ({"CHATOBS_METRICS_ON_APP": "false"}, ("CHATOBS_METRICS_ON_APP", "CHATOBS_METRICS_PORT")),
        ({"CHATOBS_METRICS_ON_APP": "sometimes"}, ("CHATOBS_METRICS_ON_APP",)),
    ],
)
def test_a_bad_protection_setting_names_its_variables_and_never_shows_the_secret(env, variables, token_file):
    env = {name: value.format(token_file=token_file) for name, value in env.items()}
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variables == variables
    assert SECRET not in str(caught.value)


def test_an_empty_or_unreadable_token_file_is_refused_without_showing_its_content(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    spaced = tmp_path / "spaced"
    spaced.write_text(f"two {SECRET}")
    for path, problem in ((empty, "is empty"), (spaced, "without spaces"), (tmp_path, "cannot be read")):
        with pytest.raises(ConfigError, match=problem) as caught:
            load_settings({"CHATOBS_METRICS_BEARER_TOKEN_FILE": str(path)})
        assert caught.value.variables == ("CHATOBS_METRICS_BEARER_TOKEN_FILE",)
        assert SECRET not in str(caught.value)


def test_secrets_do_not_show_in_the_settings_or_their_table():
    settings = load_settings({"CHATOBS_METRICS_BASIC_AUTH_USER": "prometheus",
                              "CHATOBS_METRICS_BASIC_AUTH_PASSWORD": SECRET})  # fmt: skip
    assert SECRET not in repr(settings) and SECRET not in str(settings.chatobs.model_dump())
    assert SECRET not in settings_table()


def auth_from(env: dict[str, str], refusals: list[int] | None = None) -> MetricsAuth:
    settings = load_settings(env).chatobs
    auth = MetricsAuth.from_settings(
        settings, on_refused=(lambda: refusals.append(1)) if refusals is not None else None
    )
    assert auth is not None
    return auth


def test_no_protection_configured_means_no_check():
    assert MetricsAuth.from_settings(load_settings({}).chatobs) is None


def test_bearer_token_accepts_only_the_exact_token():
    refusals: list[int] = []
    auth = auth_from({"CHATOBS_METRICS_BEARER_TOKEN": SECRET}, refusals)
    assert auth.allows(f"Bearer {SECRET}") and auth.allows(f"bearer {SECRET}")  # the scheme is case-insensitive
    for header in (None, "", "Bearer", f"Bearer {SECRET}x", f"Bearer {SECRET[:-1]}", f"Token {SECRET}",
                   basic("prometheus", SECRET)):  # fmt: skip
        assert not auth.allows(header), header
    status, headers, _ = auth.refusal(None)
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert auth.refusal(f"Bearer {SECRET}") is None
    assert len(refusals) == 1


def test_basic_auth_accepts_only_the_user_and_password():
    auth = auth_from({"CHATOBS_METRICS_BASIC_AUTH_USER": "prometheus", "CHATOBS_METRICS_BASIC_AUTH_PASSWORD": SECRET})
    assert auth.allows(basic("prometheus", SECRET))
    for header in (None, basic("prometheus", "wrong"), basic("grafana", SECRET), f"Bearer {SECRET}",
                   "Basic !!not-base64!!", "Basic " + base64.b64encode(SECRET.encode()).decode()):  # fmt: skip
        assert not auth.allows(header), header
    assert auth.refusal(None)[1]["WWW-Authenticate"].startswith('Basic realm="metrics"')


def test_a_rotated_secret_file_takes_effect_and_a_vanished_one_keeps_the_last(token_file):
    auth = auth_from({"CHATOBS_METRICS_BEARER_TOKEN_FILE": str(token_file)})
    assert auth.allows(f"Bearer {SECRET}")
    token_file.write_text("rotated-token\n")
    stat = token_file.stat()
    os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # coarse clocks
    assert auth.allows("Bearer rotated-token") and not auth.allows(f"Bearer {SECRET}")
    token_file.unlink()  # mid-rotation: the last good token still works, nothing else does
    assert auth.allows("Bearer rotated-token") and not auth.allows("Bearer ")


class CountingScrape:
    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, accept, accept_encoding, names=None):
        with self.lock:
            self.calls += 1
        return 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}, b"up 1\n"


def test_standalone_server_refuses_before_collecting():
    scrape = CountingScrape()
    server = MetricsServer(scrape, host="127.0.0.1", port=0, auth=auth_from({"CHATOBS_METRICS_BEARER_TOKEN": SECRET}))
    try:
        for method in ("GET", "HEAD"):
            refused = httpx.request(method, server.url, timeout=5)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Bearer realm="metrics"'
            wrong = httpx.request(method, server.url, headers={"Authorization": "Bearer nope"}, timeout=5)
            assert wrong.status_code == 401
        assert scrape.calls == 0, "an unauthenticated request must not trigger a collection"
        ok = httpx.get(server.url, headers={"Authorization": f"Bearer {SECRET}"}, timeout=5)
        assert ok.status_code == 200 and ok.text == "up 1\n" and scrape.calls == 1
        head = httpx.head(server.url, headers={"Authorization": f"Bearer {SECRET}"}, timeout=5)
        assert head.status_code == 200 and head.content == b""
    finally:
        server.stop()


def test_app_route_refuses_before_collecting():
    scrape = CountingScrape()
    app = Starlette()
    auth = auth_from({"CHATOBS_METRICS_BASIC_AUTH_USER": "prometheus", "CHATOBS_METRICS_BASIC_AUTH_PASSWORD": SECRET})
    mount_metrics_route(app, "/metrics", scrape, auth)

    async def scrapes() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            guess = {"Authorization": basic("prometheus", "guess")}
            return [
                await client.get("/metrics", headers=guess),
                await client.head("/metrics", headers=guess),
                await client.get("/metrics"),
                await client.get("/metrics", auth=("prometheus", SECRET)),
            ]

    *refused, ok = asyncio.run(scrapes())
    assert [r.status_code for r in refused] == [401, 401, 401]
    assert all(r.headers["www-authenticate"].startswith("Basic ") for r in refused)
    assert ok.status_code == 200 and ok.text == "up 1\n"
    assert scrape.calls == 1, "only the authenticated request collects"
