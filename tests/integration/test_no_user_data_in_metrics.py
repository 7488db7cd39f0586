"""No message text, prompt, session id, message id, file name or other free text a client sends ever
reaches a metric label (or anything else on /metrics): unique markers go through the whole pipeline
(gateway -> outbox -> publisher -> Kafka -> replicator; worker -> Somabrain and the LLM; the tool
executor, which calls the LLM too), then every service's exposition is searched for them.

Tenant names are labels by design (``tenant``, bounded by ``CHATOBS_TENANTS``), so the turns use a
fixed tenant."""

from __future__ import annotations

import uuid

import httpx
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.chat_client import ChatClient, eventually
from tests.metrics_text import value

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def marker(kind: str) -> str:
    return f"{kind}{uuid.uuid4().hex}"


def expositions(pipeline) -> dict[str, str]:
    """Every service's /metrics, as Prometheus text, as OpenMetrics (with exemplars) and gzipped."""
    found = {}
    for service, url in pipeline.metrics_urls.items():
        text = httpx.get(url, timeout=10)
        openmetrics = httpx.get(url, headers={"Accept": OPENMETRICS}, timeout=10)
        zipped = httpx.get(url, headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert zipped.headers["content-encoding"] == "gzip"
        assert list(parse_text(text.text)) and list(parse_openmetrics(openmetrics.text))  # both parse
        found[f"{service} text"] = text.text
        found[f"{service} openmetrics"] = openmetrics.text
        found[f"{service} gzip"] = zipped.text  # httpx has decompressed it
    return found


def test_no_client_text_or_identifier_appears_in_any_exposition(pipeline):
    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    replicated_before = value(httpx.get(pipeline.metrics_urls["replicator"], timeout=5).text,
                              "wal_consume_seconds_count")  # fmt: skip
    sent: list[str] = []  # everything the client chose or was given, none of which may show

    # A turn: the text goes to Somabrain (recall, remember), into the LLM prompt and back in the reply.
    text = marker("message")
    reply, _ = chat.turn(session, f"hello {text}")
    assert text in reply["content"], "the marker made the round trip through the LLM"
    sent += [text, session, reply["reply_to"]]

    # Tool calls: `summarize` sends the text to the LLM from the tool executor; `calc` carries text along.
    summary = marker("summarize")
    reply, _ = chat.turn(session, f"summarize: {summary} and more words")
    assert reply["type"] == "message"
    calc = marker("calc")
    reply, _ = chat.turn(session, f"calc: 6*7 {calc}")
    assert "42" in reply["content"]
    sent += [summary, calc]

    # A system message (stored, published and replicated, not answered) with a free-text source.
    system, source = marker("system"), marker("src")[:60]
    posted = chat.http.post(f"/v1/sessions/{session}/messages",
                            json={"role": "system", "content": f"be brief {system}", "source": source})  # fmt: skip
    assert posted.status_code == 202
    sent += [system, source, posted.json()["message_id"]]

    # An attachment: its file name and content.
    filename, content = marker("file"), marker("content")
    uploaded = chat.http.post(f"/v1/sessions/{session}/attachments",
                              files={"file": (f"{filename}.txt", content.encode(), "text/plain")})  # fmt: skip
    assert uploaded.status_code == 201
    sent += [filename, content, uploaded.json()["attachment_id"]]

    # Requests that fail: an unknown session id and an unknown path, each with its marker in the path.
    unknown_session, unknown_path = marker("session"), marker("path")
    assert chat.http.post(f"/v1/sessions/{unknown_session}/messages", json={"content": "hi"}).status_code == 404
    assert chat.http.get(f"/v1/sessions/{unknown_session}/events").status_code == 404
    assert chat.http.get(f"/{unknown_path}/{unknown_session}").status_code == 404
    sent += [unknown_session, unknown_path]

    # Every message posted (4) reached the replicator through the outbox, the publisher and Kafka.
    eventually(lambda: value(httpx.get(pipeline.metrics_urls["replicator"], timeout=5).text,
                             "wal_consume_seconds_count") >= replicated_before + 4, what="replicated")  # fmt: skip

    scraped = expositions(pipeline)
    assert len(scraped) == 3 * 5
    leaks = [(where, item) for where, text in scraped.items() for item in sent if item in text]
    assert not leaks, f"client data on /metrics: {leaks}"
    # The text did move the metrics: the same expositions show the turns.
    assert value(scraped["gateway text"], "chat_messages_in_total", role="system", source="other") >= 1
    assert value(scraped["tool_executor text"], "tool_calls_total", tool="summarize", result="success") >= 1
