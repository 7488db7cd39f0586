"""The operations assets in otel/ and collector-config.yaml, checked as Prometheus,
promtool and Grafana would read them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from chatobs import catalogue
from chatobs.catalogue import SERVICES
from chatobs.rules import ALERT_CASES, ALERTS

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "otel" / "rules"
GRAFANA = ROOT / "otel" / "grafana"
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def run_promtool(promtool_path: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool_path, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_prometheus_config_is_valid_and_scrapes_every_role(promtool):
    result = run_promtool(promtool, "check", "config", "otel/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / "otel/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(SERVICES)
    for job in jobs.values():
        assert "static_configs" not in job, "targets come from file service discovery, not this file"
    assert config["rule_files"] == ["rules/recording.yml", "rules/alerts.yml"]


def test_the_demos_prometheus_config_loads_the_rule_files(promtool, tmp_path, monkeypatch):
    """`chatobs demo` writes its config into the run directory from `otel/prometheus.yml` (a path
    relative to the checkout); the rule files it names must still be found from there."""
    from chatpipe.prometheus import LocalPrometheus

    monkeypatch.chdir(ROOT)
    written = LocalPrometheus(Path("otel/prometheus.yml"), {}, tmp_path)._write_config()
    result = run_promtool(promtool, "check", "config", str(written), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("recording.yml", "alerts.yml"):
        assert re.search(
            rf"Checking {re.escape(str(RULES / name))}\n\s+SUCCESS: [1-9]\d* rules found", result.stdout
        ), result.stdout


def test_rules_are_valid(promtool):
    result = run_promtool(promtool, "check", "rules", "otel/rules/recording.yml", "otel/rules/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass_and_cover_every_alert_both_ways(promtool):
    result = run_promtool(promtool, "test", "rules", "alerts_test.yml", cwd=RULES / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    firing = {case.alert for case in ALERT_CASES if case.fires}
    quiet = {case.alert for case in ALERT_CASES if not case.fires}
    assert firing == quiet == {alert.name for alert in ALERTS}


def test_every_alert_has_severity_summary_and_runbook():
    for group in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"page", "critical", "warning", "info"}
            assert rule["annotations"]["summary"]
            assert len(rule["annotations"]["runbook"].split()) >= 20, f"{rule['alert']}: a runbook paragraph"


def _expressions() -> list[str]:
    exprs = [rule["expr"] for path in (RULES / "recording.yml", RULES / "alerts.yml")
             for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]  # fmt: skip
    for path in GRAFANA.glob("*.json"):
        exprs += [target["expr"] for panel in json.loads(path.read_text())["panels"] for target in panel["targets"]]
    return exprs


def test_every_catalogue_metric_is_used_by_a_dashboard_or_a_rule():
    used = {name for expr in _expressions() for name in _IDENTIFIER.findall(expr)}
    used |= {name.removesuffix("_bucket") for name in used}
    unused = [metric.name for metric in catalogue.CATALOGUE if metric.name not in used]
    assert unused == []


def test_dashboards_import_anywhere_and_show_exemplars_on_latency():
    files = sorted(GRAFANA.glob("*.json"))
    assert [f.name for f in files] == sorted(
        ["chat-overview.json", "chat-llm-budgets.json", "chat-degraded-backlog.json", "chat-backends.json"]
    )
    for path in files:
        text = path.read_text()
        dashboard = json.loads(text)
        assert dashboard["schemaVersion"] >= 36  # Grafana 10+
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        uids = set(re.findall(r'"uid": "([^"]*)"', text)) - {dashboard["uid"]}
        assert uids == {"${datasource}"}, f"{path.name}: hard-coded datasource uid {uids}"
        for panel in dashboard["panels"]:
            if "_bucket[" in panel["targets"][0]["expr"]:
                assert all(target["exemplar"] for target in panel["targets"]), panel["title"]


def test_counter_panels_are_in_units_per_second():
    """A counter's panel shows its rate: CPU seconds per second are a share of a core, tokens per
    second are not requests per second."""
    metrics = {metric.name: metric for metric in catalogue.CATALOGUE}
    for path in GRAFANA.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            metric, unit = metrics[panel["title"]], panel["fieldConfig"]["defaults"]["unit"]
            if metric.prometheus_type != "counter":
                continue
            if metric.unit == "s":
                assert unit == "percentunit", panel["title"]
            elif metric.unit == "{request}":
                assert unit == "reqps", panel["title"]
            else:  # Grafana has no unit for tokens, errors, ... per second: the description says it
                assert unit == "short" and panel["description"].endswith("/s."), panel["title"]


def test_collector_pipelines_reference_only_defined_components():
    config = yaml.safe_load((ROOT / "collector-config.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"metrics", "traces"}
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            assert pipeline[kind], f"{name}: no {kind}"
            for component in pipeline[kind]:
                assert component in config[kind], f"{name}: {kind[:-1]} {component} is not defined"
        assert pipeline["processors"] == ["memory_limiter", "batch"], "memory_limiter must come first"
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    # The services' instrument names already are the catalogue's Prometheus names: a collector
    # that added suffixes would expose llm_requests_total_total. (tests/integration/test_lifecycle.py
    # shows the pushed names are the catalogue's.)
    for exporter in ("prometheus", "prometheusremotewrite"):
        assert config["exporters"][exporter]["add_metric_suffixes"] is False
    assert config["exporters"]["prometheus"]["enable_open_metrics"] is True
