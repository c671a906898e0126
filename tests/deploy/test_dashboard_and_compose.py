"""The Grafana dashboard, its provisioning, and docker-compose.yml: structure checks, every
dashboard query parsed by promtool, and every metric it names known to exist."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from splitmq.shared.metrics import Metrics
from tests.deploy.support import REPO, run

DASHBOARD = REPO / "deploy" / "grafana" / "splitmq-dashboard.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
COMPOSE = REPO / "docker-compose.yml"
#: rabbitmq_prometheus metric families the dashboard may use (tests/deploy/test_monitoring.py
#: checks every name it uses against what Prometheus scrapes from the running node).
RABBITMQ_PREFIXES = ("rabbitmq_detailed_queue_", "rabbitmq_alarms_", "rabbitmq_global_messages_",
                     "rabbitmq_process_resident_memory_bytes", "rabbitmq_resident_memory_limit_bytes",
                     "rabbitmq_disk_space_available", "rabbitmq_connections", "rabbitmq_channels")


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def splitmq_metric_names() -> set[str]:
    """Every series name shared/metrics.py exposes (with _bucket/_sum/_count, _total)."""
    registry = CollectorRegistry()
    Metrics("worker", registry)
    return {s.name for family in registry.collect() for s in family.samples}


def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    # Given the dashboard JSON
    dashboard = json.loads(DASHBOARD.read_text())
    # Then it has an id, a Prometheus data-source variable, and panels with unique ids laid
    # out inside Grafana's 24-column grid, each querying through that variable
    assert dashboard["uid"] == "splitmq" and dashboard["title"]
    variables = dashboard["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
    for p in panels(dashboard):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"].strip() and t["refId"] for t in p["targets"]), p["title"]


def test_the_dashboard_covers_what_the_issue_asks_for() -> None:
    # Given the dashboard's queries
    dashboard = json.loads(DASHBOARD.read_text())
    text = " ".join(exprs(dashboard))
    # Then training progress, per-client throughput and latency, staleness, queue depths,
    # rejections and broker health each have a query
    for needle in ("splitmq_loss", "splitmq_test_accuracy_ratio", "splitmq_samples_total",
                   "splitmq_round_trip_seconds_bucket", "splitmq_gradient_staleness_updates_bucket",
                   "rabbitmq_detailed_queue_messages_ready", "splitmq_rejected_messages_total",
                   "rabbitmq_alarms_memory_used_watermark", "rabbitmq_alarms_free_disk_space_watermark"):
        assert needle in text, needle


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    # Given every query, as a recording rule ($__rate_interval is Grafana's; use a duration)
    dashboard = json.loads(DASHBOARD.read_text())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(exprs(dashboard))]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    # When promtool checks them
    done = run([promtool, "check", "rules", str(path)])
    # Then each one parses
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_names_only_metrics_that_exist() -> None:
    # Given the metric names in the dashboard's queries
    dashboard = json.loads(DASHBOARD.read_text())
    names = set(re.findall(r"\b((?:splitmq|rabbitmq)_[a-z_]+)", " ".join(exprs(dashboard))))
    known = splitmq_metric_names()
    # Then each splitmq_ name is one shared/metrics.py exposes, each rabbitmq_ one the plugin's
    for name in names:
        if name.startswith("splitmq_"):
            assert name in known, name
        else:
            assert name.startswith(RABBITMQ_PREFIXES), name


def test_the_alert_rules_name_only_splitmq_metrics_that_exist() -> None:
    # Given the splitmq_ names in alerts.yml
    text = (REPO / "deploy" / "prometheus" / "alerts.yml").read_text()
    names = set(re.findall(r"\bsplitmq_[a-z_]+", text))
    # Then shared/metrics.py exposes each
    assert names and names <= splitmq_metric_names(), names - splitmq_metric_names()


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    # Given the provisioning files
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "splitmq.yml").read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    # Then the data source is a Prometheus on :9090 and the provider reads the directory
    # docker-compose.yml mounts the dashboard into
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].endswith(":9090")
    (provider,) = providers["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    dashboard_mount = next(m for m in mounts if m.startswith("./deploy/grafana/splitmq-dashboard.json:"))
    assert dashboard_mount.split(":")[1].startswith(provider["options"]["path"] + "/")


def test_docker_compose_defines_the_stack_with_existing_files() -> None:
    # Given docker-compose.yml
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    # Then RabbitMQ, Prometheus and Grafana are there, with pinned images
    assert {"rabbitmq", "prometheus", "grafana", "pushgateway"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
    # And every host path it mounts exists, and every named volume is declared
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    # And Prometheus runs with the project's configuration, the broker with broker_config/
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert any(m.startswith("./broker_config:") for m in services["broker-config"]["volumes"])
    # And where docker compose is installed (this project does not install Docker), it
    # accepts the file too
    docker = shutil.which("docker")
    if docker is not None and run([docker, "compose", "version"]).returncode == 0:
        done = run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"])
        assert done.returncode == 0, done.stderr

