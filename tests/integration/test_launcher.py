"""The launcher behind ``chatobs demo`` and the end-to-end tests: how it starts the pipeline."""

from __future__ import annotations

import socket

import httpx

from tests.chat_client import ChatClient
from tests.conftest import ROOT, pipeline_of_its_own


def test_a_service_whose_drawn_port_another_program_takes_starts_on_the_next_draw(stack, tmp_path, monkeypatch):
    """A port drawn for a process, taken by another program before the process bound it: the
    pipeline did not start ("CHATOBS_METRICS_PORT=N: cannot listen", a CI run's 14 errors).
    Now the process starts again on the next draw, and the caller is told.

    Taken here: the LLM simulator's port (uvicorn) and the worker's (chatobs' metrics server)."""
    from chatpipe import launcher

    real_free_port = launcher.free_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        # Draws in start order: llm_sim, somabrain_sim, llm_sim again (the first port was taken),
        # then gateway, publisher, replicator, worker...
        draws = iter([taken, None, None, None, None, None, taken])
        monkeypatch.setattr(launcher, "free_port", lambda: next(draws, None) or real_free_port())
        told: list[str] = []
        with pipeline_of_its_own(stack, tmp_path, progress=told.append) as pipeline:
            for name in ("llm_sim", "worker"):
                assert f"{name}: 127.0.0.1:{taken} was taken before it could bind it" in "\n".join(told)
            assert f"http://127.0.0.1:{taken}" not in {pipeline.url(name) for name in pipeline.pids()}
            worker = httpx.get(pipeline.metrics_urls["worker"], timeout=5)
            assert worker.status_code == 200 and "degraded_buffer_size" in worker.text
            # The services were given the simulator's new address: a turn is answered.
            chat = ChatClient(pipeline.gateway_url)
            final, _ = chat.turn(chat.new_session(), "hello")
            assert final["type"] == "message" and final["content"].startswith("You said: hello."), final


def test_the_local_prometheus_whose_drawn_port_another_program_takes_starts_on_the_next_draw(tmp_path, monkeypatch):
    """The demo's Prometheus, on a port taken before it bound it: "Prometheus did not start". Now
    the next draw."""
    from chatpipe import prometheus

    real_free_port = prometheus.free_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        draws = iter([taken])
        monkeypatch.setattr(prometheus, "free_port", lambda: next(draws, None) or real_free_port())
        with prometheus.LocalPrometheus(ROOT / "otel" / "prometheus.yml", {}, tmp_path, interval="1s") as local:
            assert local.url != f"http://127.0.0.1:{taken}"
            assert httpx.get(f"{local.url}/-/ready", timeout=5).status_code == 200
