"""THE monitoring test: the real Prometheus, started by deploy/stack.sh with the project's scrape
configuration (a test copy on other ports, scraping every 250 ms), watches a short real
training (`splitmq server` and two `splitmq worker` processes, one epoch), and its HTTP API
shows the trainer's, a worker's and the broker's metrics with values that moved. Also: a
Pushgateway push reaches Prometheus, Prometheus loaded the alert rules, and stack.sh is
idempotent."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from splitmq.shared import amqp, topology
from splitmq.shared.metrics import Metrics
from splitmq.shared.push import start_pushing
from tests.deploy.support import REPO, STACK, TEST_METRICS_BASE, Stack, run, wait_for

RANGE = "[10m]"


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A `splitmq` party in its own process group, so a failing test can end it by its id."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "splitmq", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the party finishes its message and checkpoints), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def consumers(job: str) -> int:
    """Consumers on the job's forward queue, from the management API (0 if it is not there yet)."""
    from splitmq.workers.status import DEFAULT_MANAGEMENT_URL, fetch, queue_rows

    rows = queue_rows(json.loads(fetch(f"{DEFAULT_MANAGEMENT_URL}/api/queues/%2F")), job)
    return sum(r.consumers for r in rows if r.kind == "forward")


def values(stack: Stack, expr: str) -> list[float]:
    return [float(r["value"][1]) for r in stack.query(expr)]


def moved(stack: Stack, selector: str) -> bool:
    """Prometheus saw the series take more than one value during the test."""
    return any(v > 0 for v in values(stack, f"changes({selector}{RANGE})"))


def test_prometheus_scrapes_the_trainer_a_worker_and_the_broker_during_a_training(
        monitoring_stack: Stack, amqp_url: str, tmp_path: Path) -> None:
    stack = monitoring_stack
    # Given Prometheus already scraping the broker (its own exporter and per-queue metrics)
    wait_for(lambda: values(stack, 'up{job="rabbitmq"}') == [1.0]
             and values(stack, 'up{job="rabbitmq-queues"}') == [1.0], "Prometheus to scrape the broker")
    received_before = sum(values(stack, "rabbitmq_global_messages_received_total"))
    job = "mon" + uuid.uuid4().hex[:8]
    common = ["--amqp-url", amqp_url, "--job-id", job, "--num-clients", "2", "--epochs", "1", "--model", "mlp",
              "--max-in-flight", "2", "--run-dir", str(tmp_path / "run")]
    # When a short training runs with its metrics on the ports the configuration scrapes: the
    # trainer first (it declares the job), then two workers once it consumes
    server = spawn(["server", *common, "--metrics-port", str(TEST_METRICS_BASE),
                    "--summary-json", str(tmp_path / "server.json")], tmp_path / "server.log")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: server.poll() is not None or consumers(job) > 0, "the trainer to consume", timeout=180)
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        workers = [spawn(["worker", *common, "--client-id", f"client-{i}", "--client-index", str(i),
                          "--metrics-port", str(TEST_METRICS_BASE + 1 + i),
                          "--summary-json", str(tmp_path / f"client-{i}.json")], tmp_path / f"client-{i}.log")
                   for i in range(2)]
        for i, w in enumerate(workers):
            assert w.wait(300) == 0, (tmp_path / f"client-{i}.log").read_text()[-3000:]
        summary = json.loads((tmp_path / "client-0.json").read_text())
        assert summary["samples"] > 0
        # Then Prometheus has the trainer's counters moving, from the trainer's target
        trainer = '{job="splitmq-trainer", role="trainer"}'
        assert moved(stack, 'splitmq_batches_total{job="splitmq-trainer", outcome="applied"}')
        # (the trainer exits by itself once the owners are done: look over the test's range)
        wait_for(lambda: any(v > 0 for v in values(stack, f"max_over_time(splitmq_samples_total{trainer}{RANGE})")),
                 "the trainer's sample count in Prometheus")
        # And a worker's, from a worker target (instance :9501)
        worker = f'{{job="splitmq-workers", instance="localhost:{TEST_METRICS_BASE + 1}", role="worker"}}'
        assert moved(stack, f"splitmq_samples_total{worker}")
        assert any(v > 0 for v in values(stack, f"max_over_time(splitmq_round_trip_seconds_count{worker}{RANGE})"))
        # And the broker's: messages received went up, and the job's forward queue was scraped
        wait_for(lambda: sum(values(stack, "rabbitmq_global_messages_received_total")) > received_before,
                 "the broker's received-messages counter to move in Prometheus")
        forward = f'{{job="rabbitmq-queues", queue="{topology.forward_queue(job)}"}}'
        assert values(stack, f"count_over_time(rabbitmq_detailed_queue_messages_ready{forward}{RANGE})")
    finally:
        for proc in [*workers, server]:
            end(proc)
        # The job's queues are this test's own; remove them so the shared broker stays clean.
        amqp.delete_queues(amqp_url, [topology.forward_queue(job), topology.dead_letter_queue(job)]
                             + [topology.reply_queue(job, f"client-{i}") for i in range(2)])


def test_a_pushed_worker_reaches_prometheus_through_the_pushgateway(monitoring_stack: Stack) -> None:
    stack = monitoring_stack
    # Given a worker behind NAT pushing its metrics as its client id
    client = "edge-" + uuid.uuid4().hex[:6]
    registry = CollectorRegistry()
    metrics = Metrics("worker", registry)
    metrics.samples.labels("worker").inc(192)
    stop = start_pushing(stack.pushgateway, job="splitmq-worker", instance=client, registry=registry, interval_s=0.5)
    stop()
    # When Prometheus scrapes the gateway (honor_labels keeps the pushed job and instance)
    selector = f'splitmq_samples_total{{job="splitmq-worker", instance="{client}", role="worker"}}'
    # Then the worker's samples are there under its own client id
    got = wait_for(lambda: values(stack, selector), f"{selector} in Prometheus")
    assert got == [192.0]


def test_stack_start_is_idempotent_and_status_reports_the_services(monitoring_stack: Stack) -> None:
    # Given the running stack
    # When start runs a second time, then status
    again = run([str(STACK), "start"], env=monitoring_stack.env)
    status = run([str(STACK), "status"], env=monitoring_stack.env)
    # Then nothing is started twice, and all three services are reported up
    assert again.returncode == 0, again.stdout + again.stderr
    assert "prometheus already running" in again.stdout and "pushgateway already running" in again.stdout
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("running (pid") == 2 and "rabbitmq: metrics at" in status.stdout


def test_prometheus_loaded_the_alert_rules(monitoring_stack: Stack) -> None:
    # Given the running Prometheus
    with urllib.request.urlopen(f"{monitoring_stack.prometheus}/api/v1/rules", timeout=10) as resp:
        groups: list[dict[str, Any]] = json.load(resp)["data"]["groups"]
    # Then it evaluates the project's alert groups, the silent-client alert among them
    names = {r["name"] for g in groups for r in g["rules"]}
    assert "SplitmqClientSilent" in names and "RabbitmqMemoryAlarm" in names


def test_every_broker_metric_the_dashboard_and_alerts_use_is_scraped_from_the_real_node(
        monitoring_stack: Stack) -> None:
    # Given the rabbitmq_ metric names in the dashboard's queries and the alert rules
    dashboard = json.loads((REPO / "deploy/grafana/splitmq-dashboard.json").read_text())
    text = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    text += (REPO / "deploy/prometheus/alerts.yml").read_text()
    wanted = set(re.findall(r"\brabbitmq_[a-z_]+", text)) - {"rabbitmq_prometheus"}  # the plugin's name
    # When Prometheus has scraped the running broker (plain and per-queue endpoints)
    wait_for(lambda: values(monitoring_stack, 'up{job="rabbitmq-queues"}') == [1.0], "the per-queue scrape")

    def names() -> set[str]:
        with urllib.request.urlopen(f"{monitoring_stack.prometheus}/api/v1/label/__name__/values", timeout=10) as r:
            return set(json.load(r)["data"])

    # Then each of those names is a series Prometheus holds
    assert len(wanted) > 10
    wait_for(lambda: wanted <= names(), f"every one of {sorted(wanted)} to be scraped")


def _alerts(stack: Stack) -> dict[str, set[str]]:
    """Every splitmq alert now pending or firing: name -> instances."""
    out: dict[str, set[str]] = {}
    for r in stack.query('ALERTS{alertname=~"Splitmq.*"}'):
        out.setdefault(r["metric"]["alertname"], set()).add(r["metric"].get("instance", ""))
    return out


def _evaluated_after(stack: Stack, moment: float) -> bool:
    """Prometheus has evaluated the splitmq rules at least once after ``moment`` (Unix time)."""
    with urllib.request.urlopen(f"{stack.prometheus}/api/v1/rules", timeout=10) as resp:
        groups = json.load(resp)["data"]["groups"]
    from datetime import datetime
    stamps = [datetime.fromisoformat(g["lastEvaluation"].replace("Z", "+00:00")).timestamp()
              for g in groups if g["name"].startswith("splitmq")]
    return bool(stamps) and min(stamps) > moment


def test_a_clean_run_pages_nobody_and_a_worker_that_dies_does(
        monitoring_stack: Stack, amqp_url: str, tmp_path: Path) -> None:
    import time

    stack = monitoring_stack
    # Given a short job on the scraped ports (a trainer and an owner, each lingering for a scrape),
    # and, for contrast, a lone owner of another job that will die
    job, other = "quiet" + uuid.uuid4().hex[:8], "dies" + uuid.uuid4().hex[:8]
    common = ["--amqp-url", amqp_url, "--epochs", "2", "--run-dir", str(tmp_path / "run"), "--metrics-linger", "2"]
    server = spawn(["server", *common, "--job-id", job, "--metrics-port", str(TEST_METRICS_BASE)],
                   tmp_path / "server.log")
    owner = spawn(["worker", *common, "--job-id", job, "--metrics-port", str(TEST_METRICS_BASE + 1)],
                  tmp_path / "owner.log")
    doomed = spawn(["worker", *common, "--job-id", other, "--metrics-port", str(TEST_METRICS_BASE + 2)],
                   tmp_path / "doomed.log")
    clean = {f"localhost:{TEST_METRICS_BASE}", f"localhost:{TEST_METRICS_BASE + 1}"}
    dead = f"localhost:{TEST_METRICS_BASE + 2}"
    try:
        # When the job runs to its end, and the other owner is killed once Prometheus has seen it up
        wait_for(lambda: values(stack, f'up{{job="splitmq-workers", instance="{dead}"}}') == [1.0],
                 "Prometheus to scrape the doomed owner")
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        assert owner.wait(300) == 0, (tmp_path / "owner.log").read_text()[-2000:]
        assert server.wait(300) == 0, (tmp_path / "server.log").read_text()[-2000:]
        gone = time.time()
        wait_for(lambda: _evaluated_after(stack, gone + 1.0), "the alert rules to be evaluated after the run")
        alerts = _alerts(stack)
        # Then the owner that died is reported down, and nothing of the finished job pages anyone
        assert dead in alerts.get("SplitmqWorkerDown", set()), alerts
        assert not any(clean & instances for instances in alerts.values()), alerts
    finally:
        for proc in (server, owner, doomed):
            end(proc)
        from splitmq.workers.job_admin import delete_job
        for name in (job, other):
            delete_job(name)
