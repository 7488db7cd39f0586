from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from chatobs.catalogue import SERVICES

ROOT = Path(__file__).resolve().parents[2]


def test_prometheus_config_is_valid_and_scrapes_every_role(promtool):
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "otel/prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / "otel/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(SERVICES)
    for job in jobs.values():
        assert "static_configs" not in job, "targets come from file service discovery, not this file"


def test_collector_pipelines_reference_only_defined_components():
    config = yaml.safe_load((ROOT / "collector-config.yaml").read_text())
    assert config["service"]["pipelines"], "no pipeline"
    for name, pipeline in config["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{name}: {kind[:-1]} {component} is not defined"
    exporter = config["exporters"]["prometheus"]
    # The services' names already are Prometheus names: the collector must not add suffixes.
    assert exporter["add_metric_suffixes"] is False
    assert exporter["enable_open_metrics"] is True
