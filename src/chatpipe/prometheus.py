"""A local Prometheus for the pipeline: ``otel/prometheus.yml`` with generated targets.

The scrape config keeps its jobs; targets are written as file service discovery
(``targets/<job>.json``) from the running pipeline's metrics URLs; intervals can be
shortened for a demo or a test, and the rule files swapped (e.g. the test profile).

Example::

    with LocalPrometheus(Path("otel/prometheus.yml"), pipeline.metrics_urls, run_dir, interval="2s") as prom:
        print(prom.url)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import yaml

from chatobs.stack import PORT_ATTEMPTS, free_port, port_is_free

__all__ = ["LocalPrometheus", "PrometheusUnavailableError"]


class PrometheusUnavailableError(RuntimeError):
    """No ``prometheus`` binary, or it did not become ready (the message has its log)."""


class LocalPrometheus:
    def __init__(
        self,
        config: Path,
        metrics_urls: Mapping[str, str],
        run_dir: Path,
        *,
        interval: str = "15s",
        rules: Mapping[str, str] | None = None,
        extra_flags: Sequence[str] = ("--enable-feature=exemplar-storage",),
    ):
        self._config = config
        self._metrics_urls = metrics_urls
        self._dir = run_dir / "prometheus"
        self._interval = interval
        self._rules = rules
        self._flags = extra_flags
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def _write_config(self) -> Path:
        config = yaml.safe_load(self._config.read_text())
        config.setdefault("global", {}).update(
            scrape_interval=self._interval, evaluation_interval=self._interval, scrape_timeout=self._interval
        )
        (self._dir / "targets").mkdir(parents=True, exist_ok=True)
        for job in config["scrape_configs"]:
            url = self._metrics_urls.get(job["job_name"])
            address = [url.removeprefix("http://").split("/", 1)[0]] if url else []
            (self._dir / "targets" / f"{job['job_name']}.json").write_text(json.dumps([{"targets": address}]))
        if self._rules is not None:
            config["rule_files"] = []
            for name, text in self._rules.items():
                (self._dir / name).write_text(text)
                config["rule_files"].append(name)
        else:
            # The original config's rule files. Prometheus resolves a relative rule path against the
            # directory of the config file naming it, and the file written here is in the run
            # directory: each is anchored to the original's directory (an absolute one stays as is).
            base = self._config.resolve().parent
            config["rule_files"] = [str(base / path) for path in config.get("rule_files", [])]
        path = self._dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, timeout: float = 30.0) -> LocalPrometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusUnavailableError("no prometheus binary (Debian package `prometheus`)")
        self._dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        log = self._dir / "prometheus.log"
        deadline = time.monotonic() + timeout
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(log, "ab") as out:
                self._process = subprocess.Popen(
                    [binary, f"--config.file={config}", f"--storage.tsdb.path={self._dir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{port}", *self._flags],
                    stdout=out, stderr=subprocess.STDOUT, cwd=self._dir,
                    start_new_session=True,  # a Ctrl-C aimed at the caller is its to relay
                )  # fmt: skip
            while time.monotonic() < deadline and self._process.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                        return self
                time.sleep(0.2)
            # Another program took the port drawn before Prometheus bound it: the next draw.
            if self._process.poll() is None or attempt == PORT_ATTEMPTS or port_is_free(port):
                break
        self.stop()
        tail = " ".join(log.read_text(errors="replace").splitlines()[-3:])
        raise PrometheusUnavailableError(f"Prometheus did not start: {tail}")

    def alerts(self, state: str = "firing") -> set[str]:
        """Names of the alerts in ``state`` (``firing`` or ``pending``)."""
        response = httpx.get(f"{self.url}/api/v1/alerts", timeout=5)
        response.raise_for_status()
        return {a["labels"]["alertname"] for a in response.json()["data"]["alerts"] if a["state"] == state}

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=20)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
