"""The py-spy classification behind the CPU-share figure (bench/profile_share.py): which
samples count as instrumentation, whose code they were in, and where the app entered it."""

from __future__ import annotations

import sys
import sysconfig

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from profile_share import share_of

SITE = "/venv/lib/python3.11/site-packages"
STDLIB = sysconfig.get_paths()["stdlib"]
LOOP = f"run_forever ({STDLIB}/asyncio/base_events.py:607)"
HANDLER = "post_message (/app/src/chatpipe/gateway/service.py:243)"
CONTRIB = f"_do_execute ({SITE}/opentelemetry/instrumentation/asyncpg/__init__.py:237)"
TRACER = "start_span (/app/src/chatobs/tracing.py:268)"
SDK = f"generate_span_id ({SITE}/opentelemetry/sdk/trace/id_generator.py:40)"
ASYNCPG = f"_do_execute ({SITE}/asyncpg/connection.py:2035)"
LOCK = f"__enter__ ({STDLIB}/threading.py:100)"


def test_samples_are_charged_by_their_innermost_non_stdlib_frame():
    raw = "\n".join([
        f"{LOOP};{HANDLER};{CONTRIB};{TRACER} 3",  # chatobs's tracer, under the contrib wrapper
        f"{LOOP};{HANDLER};{CONTRIB};{TRACER};{SDK} 2",  # the SDK's id generator, called by it
        f"{LOOP};{HANDLER};{CONTRIB};{TRACER};{LOCK} 1",  # a stdlib lock taken by chatobs: chatobs's
        f"{LOOP};{HANDLER};{CONTRIB};{ASYNCPG} 10",  # the wrapped statement itself: the application's
        f"{LOOP};{HANDLER} 4",
        f"{LOOP} 20",  # the event loop's own work: the application's (its entry point owns it)
        "garbage line",
    ])  # fmt: skip
    result = share_of(raw)
    assert result.samples == 40
    assert result.instrumentation == 6
    assert result.share == 6 / 40
    assert dict(result.owners()) == {"chatobs": 4 / 40, "OpenTelemetry API and SDK": 2 / 40}
    # Entered through the contrib wrapper, the outermost instrumentation frame under the handler.
    assert result.entries() == [("_do_execute (__init__.py)", 6 / 40)]


def test_threads_the_instrumentation_runs_are_its_own_whole():
    thread = f"_bootstrap ({STDLIB}/threading.py:995);run ({STDLIB}/threading.py:975)"
    worker = f"worker ({SITE}/opentelemetry/sdk/_shared_internal/__init__.py:200)"
    sending = f"send ({SITE}/requests/sessions.py:700);urlopen ({SITE}/urllib3/connectionpool.py:787)"
    server = f"_serve ({SITE}/chatobs/server.py:400);{LOOP};on_url (/app/src/chatobs/server.py:300)"
    raw = "\n".join([
        f"{thread};{worker};_encode_span ({SITE}/opentelemetry/exporter/otlp/encoder.py:50) 3",
        f"{thread};{worker};{sending} 4",  # the export's POST: requests and urllib3, for the exporter
        f"{thread};{server} 2",  # the standalone metrics server's loop
        f"{thread};{LOCK} 5",  # a standard-library-only thread: nobody's
        f"{LOOP};{HANDLER};{ASYNCPG} 6",  # the application's own use of a library
        # A task whose coroutine begins in a dispatcher (asyncio.wait_for's): the statement is the application's.
        f"{LOOP};dispatch (/app/src/chatobs/instrumentation/dispatch.py:205);{ASYNCPG} 7",
    ])  # fmt: skip
    result = share_of(raw)
    assert result.samples == 27
    assert result.instrumentation == 9
    assert dict(result.owners()) == {"OpenTelemetry API and SDK": 7 / 27, "chatobs": 2 / 27}
    assert dict(result.top())["urlopen (connectionpool.py)"] == 4 / 27


def test_samples_serving_a_scrape_are_told_apart_from_recording():
    served = f"serve ({SITE}/chatobs/server.py:300)"
    rendered = f"Renderer._histogram_lines ({SITE}/chatobs/exposition.py:88)"
    scrape = f"Telemetry.scrape ({SITE}/chatobs/telemetry.py:233)"
    snapshot = f"HistogramCell.snapshot ({SITE}/chatobs/cells.py:215)"
    thread = f"_bootstrap ({STDLIB}/threading.py:995)"
    raw = "\n".join([
        f"{thread};{served};{rendered} 3",  # the standalone metrics server's thread
        f"{LOOP};{HANDLER};{scrape};{snapshot} 2",  # a FastAPI /metrics route's scrape, in cells
        f"{LOOP};{HANDLER};{CONTRIB};{TRACER} 5",  # recording: instrumentation, not serving
        f"{LOOP};{HANDLER} 10",
    ])  # fmt: skip
    result = share_of(raw)
    assert (result.instrumentation, result.serving) == (10, 5)
    assert result.serving_share == 5 / 20
