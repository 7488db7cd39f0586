"""Whatever a client sends, the real gateway answers a 4xx with a JSON ``{"error": ...}`` body,
never a 500, and its HTTP metrics show the answer under the route template, never the raw path."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.chat_client import ChatClient, eventually
from tests.metrics_text import value

JSON = {"Content-Type": "application/json"}
SESSIONS = "/v1/sessions"
SESSION = "/v1/sessions/{session_id}"
MESSAGES = "/v1/sessions/{session_id}/messages"
ATTACHMENTS = "/v1/sessions/{session_id}/attachments"
EVENTS = "/v1/sessions/{session_id}/events"


@dataclass
class Case:
    what: str
    method: str
    route: str  # the template the HTTP metrics must show ("" when no route matches)
    status: int
    error: str  # expected in the body's "error"
    request: dict[str, Any] = field(default_factory=dict)
    session: str | None = None  # None: the test's live session
    path: str | None = None  # a raw path instead of the route filled with the session


def chunked(*parts: bytes):
    """A body without Content-Length (httpx sends an iterator chunked): only counting can stop it."""
    yield from parts


def multipart(size: int) -> tuple[bytes, str]:
    boundary = "chatobs-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
    head += "Content-Type: text/plain\r\n\r\n"
    body = head.encode() + b"x" * size + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


BIG_UPLOAD, BIG_UPLOAD_TYPE = multipart(60_000)  # the pipeline allows 1000 bytes (tests/conftest.py)
UNKNOWN = uuid.uuid4().hex
LONG_ID = "a" * 3000

CASES = [
    Case("malformed JSON", "POST", MESSAGES, 400, "malformed JSON body",
         {"content": b'{"content": "unfinished', "headers": JSON}),
    Case("JSON nested beyond the parser", "POST", MESSAGES, 400, "malformed JSON body",
         {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON}),
    Case("not UTF-8", "POST", MESSAGES, 400, "malformed JSON body",
         {"content": b'{"content": "\xff\xfe"}', "headers": JSON}),
    Case("text/plain body", "POST", MESSAGES, 415, "expected a JSON body",
         {"content": b'{"content": "hi"}', "headers": {"Content-Type": "text/plain"}}),
    Case("no content type", "POST", MESSAGES, 415, "expected a JSON body", {"content": b'{"content": "hi"}'}),
    Case("form body", "POST", MESSAGES, 415, "expected a JSON body", {"data": {"content": "hi"}}),
    Case("content of the wrong type", "POST", MESSAGES, 422, "invalid message", {"json": {"content": 5}}),
    Case("a list, not an object", "POST", MESSAGES, 422, "invalid message", {"json": ["hi"]}),
    Case("no content", "POST", MESSAGES, 422, "invalid message", {"json": {"role": "user"}}),
    Case("empty content", "POST", MESSAGES, 422, "invalid message", {"json": {"content": ""}}),
    Case("unknown role", "POST", MESSAGES, 422, "role must be one of", {"json": {"content": "hi", "role": "robot"}}),
    Case("source too long", "POST", MESSAGES, 422, "invalid message", {"json": {"content": "hi", "source": "s" * 65}}),
    # PostgreSQL stores neither: these were 500s from the database.
    Case("NUL in the text", "POST", MESSAGES, 422, "invalid message", {"json": {"content": "a\x00b"}}),
    Case("unpaired surrogate", "POST", MESSAGES, 422, "invalid message",
         {"content": b'{"content": "a\\ud800b"}', "headers": JSON}),
    Case("over CHATPIPE_MESSAGE_MAX_CHARS", "POST", MESSAGES, 413, "longer than 8000 characters",
         {"json": {"content": "x" * 8001}}),
    Case("over CHATPIPE_REQUEST_MAX_BYTES", "POST", MESSAGES, 413, "larger than 262144 bytes",
         {"json": {"content": "x" * 2_000_000}}),
    Case("chunked over CHATPIPE_REQUEST_MAX_BYTES", "POST", MESSAGES, 413, "larger than 262144 bytes",
         {"content": chunked(b'{"content": "', b"x" * 300_000, b'"}'), "headers": JSON}),
    Case("unknown session", "POST", MESSAGES, 404, f"no session {UNKNOWN}", {"json": {"content": "hi"}}, UNKNOWN),
    Case("session id with NUL", "POST", MESSAGES, 404, "no session", {"json": {"content": "hi"}}, "not%00a-session"),
    Case("very long session id", "DELETE", SESSION, 404, "no session", {}, LONG_ID),
    Case("events of an unknown session", "GET", EVENTS, 404, "no session", {}, UNKNOWN),
    Case("an unknown session", "GET", SESSION, 404, "no session", {}, UNKNOWN),
    Case("attachment for an unknown session", "POST", ATTACHMENTS, 404, "no session",
         {"files": {"file": ("a.txt", b"hi", "text/plain")}}, UNKNOWN),
    Case("attachment over the limit, by its Content-Length", "POST", ATTACHMENTS, 413,
         "attachment larger than 1000 bytes", {"content": BIG_UPLOAD, "headers": {"Content-Type": BIG_UPLOAD_TYPE}}),
    Case("attachment over the limit, chunked", "POST", ATTACHMENTS, 413, "attachment larger than 1000 bytes",
         {"content": chunked(BIG_UPLOAD[:100], BIG_UPLOAD[100:]), "headers": {"Content-Type": BIG_UPLOAD_TYPE}}),
    Case("attachment as JSON", "POST", ATTACHMENTS, 415, "expected a multipart/form-data upload", {"json": {}}),
    Case("attachment without a file field", "POST", ATTACHMENTS, 422, "needs a `file` field",
         {"files": {"other": ("a.txt", b"hi", "text/plain")}}),
    Case("broken multipart", "POST", ATTACHMENTS, 400, "multipart",
         {"content": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}),
    Case("attachment of a refused type", "POST", ATTACHMENTS, 415, "not accepted",
         {"files": {"file": ("a.exe", b"MZ", "application/x-msdownload")}}),
    Case("no tenant header", "POST", SESSIONS, 422, "invalid request", {}),
    Case("malformed tenant", "POST", SESSIONS, 400, "X-Tenant-ID", {"headers": {"X-Tenant-ID": "no spaces"}}),
    Case("unknown method", "PUT", MESSAGES, 405, "Method Not Allowed", {"json": {"content": "hi"}}),
    Case("unknown route", "GET", "", 404, "Not Found", {}, path=f"/v1/no-such-route/{UNKNOWN}"),
]  # fmt: skip


def test_every_client_error_is_a_4xx_json_answer_counted_by_route_template(pipeline):
    chat = ChatClient(pipeline.gateway_url)
    live = chat.new_session()
    metrics_url = pipeline.metrics_urls["gateway"]
    before = httpx.get(metrics_url, timeout=5).text
    expected: Counter[tuple[str, str, str]] = Counter()
    for case in CASES:
        path = case.path or case.route.replace("{session_id}", case.session or live)
        response = chat.http.request(case.method, path, **case.request)
        assert response.status_code == case.status, (case.what, response.status_code, response.text[:300])
        assert response.headers["content-type"] == "application/json", case.what
        body = response.json()
        assert set(body) <= {"error", "detail"} and isinstance(body["error"], str), (case.what, body)
        assert case.error in body["error"], (case.what, body)
        expected[(case.method, case.route, str(case.status))] += 1

    after = httpx.get(metrics_url, timeout=5).text
    for (method, route, status), count in expected.items():
        labels = {"http_request_method": method, "http_route": route, "http_response_status_code": status}
        moved = value(after, "http_server_request_duration_seconds_count", **labels) - value(
            before, "http_server_request_duration_seconds_count", **labels
        )
        assert moved == count, (labels, moved, count)
    assert 'http_response_status_code="500"' not in after
    for raw in (UNKNOWN, LONG_ID[:100], "no-such-route", "not\\u0000a"):
        assert raw not in after, f"{raw!r} reached a label"


def test_a_client_that_closes_mid_body_is_a_499_not_a_server_error(pipeline):
    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    metrics_url = pipeline.metrics_urls["gateway"]
    url = httpx.URL(pipeline.gateway_url)
    before = httpx.get(metrics_url, timeout=5).text
    uploads = (
        (MESSAGES, "application/json", b'{"content": "hel'),
        (ATTACHMENTS, "multipart/form-data; boundary=b",
         b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\nab'),
    )  # fmt: skip
    for route, content_type, part in uploads:
        with socket.create_connection((url.host, url.port), timeout=5) as connection:
            path = route.replace("{session_id}", session)
            connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: {content_type}\r\n"
                               f"Content-Length: 1000\r\n\r\n".encode() + part)  # fmt: skip
            time.sleep(0.3)  # the gateway is reading the body when the client goes
    status = {"http_request_method": "POST", "http_response_status_code": "499"}

    def moved(route: str, **labels: str) -> float:
        after = httpx.get(metrics_url, timeout=5).text
        name = "http_server_request_duration_seconds_count"
        return value(after, name, http_route=route, **labels) - value(before, name, http_route=route, **labels)

    eventually(lambda: moved(MESSAGES, **status) == 1 and moved(ATTACHMENTS, **status) == 1, timeout=10,
               what="both aborted requests counted as 499")  # fmt: skip
    after = httpx.get(metrics_url, timeout=5).text
    assert 'http_response_status_code="500"' not in after, "an aborted upload counted as a server error"


def test_a_message_sent_again_with_its_idempotency_key_is_stored_and_counted_once(pipeline):
    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    metrics_url = pipeline.metrics_urls["gateway"]
    path = f"/v1/sessions/{session}/messages"
    scraped = httpx.get(metrics_url, timeout=5).text
    before, enqueued_before = value(scraped, "chat_messages_in_total"), value(scraped, "chat_enqueue_seconds_count")
    key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    first = chat.http.post(path, json={"content": "once, please"}, headers=key)
    again = chat.http.post(path, json={"content": "once, please"}, headers=key)
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["message_id"] == again.json()["message_id"]
    assert again.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in first.headers
    other = chat.http.post(path, json={"content": "something else"}, headers=key)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"]
    elsewhere = chat.http.post(f"/v1/sessions/{chat.new_session()}/messages", json={"content": "once, please"},
                               headers=key)  # fmt: skip
    assert elsewhere.status_code == 202 and elsewhere.json()["message_id"] != first.json()["message_id"]
    bad = chat.http.post(path, json={"content": "x"}, headers={"Idempotency-Key": "has spaces"})
    assert bad.status_code == 400
    scraped = httpx.get(metrics_url, timeout=5).text
    assert value(scraped, "chat_messages_in_total") - before == 2, "the replay was counted as a message in"
    enqueued = value(scraped, "chat_enqueue_seconds_count") - enqueued_before
    assert enqueued == 2, "a refused or replayed message was timed as an enqueue"


def test_two_deletes_of_one_session_at_once_count_one_deletion(pipeline):
    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    metrics_url = pipeline.metrics_urls["gateway"]
    before = value(httpx.get(metrics_url, timeout=5).text, "sessions_deleted_total")

    async def both() -> list[int]:
        async with httpx.AsyncClient(base_url=pipeline.gateway_url, timeout=10) as client:
            answers = await asyncio.gather(*(client.delete(f"/v1/sessions/{session}") for _ in range(4)))
        return sorted(answer.status_code for answer in answers)

    statuses = asyncio.run(both())
    assert statuses[0] == 204 and set(statuses) <= {204, 410}, statuses
    assert value(httpx.get(metrics_url, timeout=5).text, "sessions_deleted_total") - before == 1


def test_a_message_sent_as_its_session_is_deleted_is_refused_not_accepted_after_the_delete(pipeline):
    """The DELETE's transaction is held open by the test: the message's look-up still sees the
    session live, and the message must wait for the DELETE's outcome instead of being stored
    (and answered 202) in a session the client was told (204) is gone."""
    import asyncpg

    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    url = f"{pipeline.gateway_url}/v1/sessions/{session}/messages"

    async def race() -> tuple[int, int]:
        connection = await asyncpg.connect(pipeline.backends["DATABASE_URL"])
        try:
            async with httpx.AsyncClient(timeout=15) as client:
                transaction = connection.transaction()
                await transaction.start()
                await connection.execute("update sessions set deleted_at = now() where id = $1", session)
                posted = asyncio.ensure_future(client.post(url, json={"content": "just in time?"}))
                await asyncio.sleep(1.0)  # the gateway has looked the session up and reached the insert
                waited = not posted.done()
                await transaction.commit()
                answer = await posted
                stored = await connection.fetchval("select count(*) from outbox where session_id = $1", session)
                assert waited, f"the message did not wait for the DELETE: {answer.status_code}"
                return answer.status_code, stored
        finally:
            await connection.close()

    status, stored = asyncio.run(race())
    assert (status, stored) == (410, 0)
