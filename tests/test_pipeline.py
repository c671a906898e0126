"""End to end on the real broker: split training reproduces local training."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from splitmq.shared import local
from splitmq.shared.config import BottomSync, JobConfig
from splitmq.shared.metrics import serve
from splitmq.workers.exits import ExitReason
from tests.helpers import assert_segments_equal, in_thread


def test_synchronous_split_training_matches_local_training_step_by_step(amqp_url: str, job_id: str) -> None:
    # Given one owner, one batch in flight, a fixed seed, and the same batch order locally
    cfg = JobConfig(job_id=job_id, epochs=2, bottom_sync=BottomSync.INDEPENDENT)
    reference = local.train_local(cfg)

    # When the same job is trained split across a worker and a trainer through RabbitMQ
    top = in_thread("server", cfg, amqp_url)
    owner = in_thread("worker", cfg, amqp_url, evaluate=False)
    owner_end, top_end = owner.wait(), top.wait()

    # Then both ended by themselves, and every step's loss and both segments equal local training's
    assert owner_end.reason is ExitReason.DONE and top_end.reason is ExitReason.DONE, (owner_end, top_end.detail)
    split_losses = owner_end.summary["losses"]
    assert len(split_losses) == len(reference.losses)
    assert split_losses == reference.losses
    assert_segments_equal([owner.roles[0].stage.segment.state_dict(), top.roles[1].stage.segment.state_dict()],
                          reference.segments)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_both_metrics_endpoints_serve_the_pipeline_metrics_and_they_move(amqp_url: str, job_id: str) -> None:
    # Given a trainer and a worker each serving /metrics
    cfg = JobConfig(job_id=job_id, epochs=2, max_in_flight=2, bottom_sync=BottomSync.INDEPENDENT)
    top = in_thread("server", cfg, amqp_url)
    owner = in_thread("worker", cfg, amqp_url)
    ports = {"trainer": serve(0, top.stats.metrics.registry, "127.0.0.1"),  # type: ignore[union-attr]
             "worker": serve(0, owner.stats.metrics.registry, "127.0.0.1")}  # type: ignore[union-attr]
    before = {role: _scrape(port) for role, port in ports.items()}
    # When training runs to the end
    owner_end, top_end = owner.wait(), top.wait()
    after = {role: _scrape(port) for role, port in ports.items()}
    assert owner_end.reason is ExitReason.DONE and top_end.reason is ExitReason.DONE

    # Then every metric the dashboard uses is there, and the training ones moved
    def value(role: str, snapshot: dict[str, dict[str, float]], name: str, **labels: str) -> float:
        return snapshot[role][f"{name}{sorted({'job_id': job_id, 'role': role, **labels}.items())}"]

    batches = owner_end.summary["batches"]
    for role in ("trainer", "worker"):
        for name, labels in [("splitmq_samples_total", {}), ("splitmq_bytes_total", {"direction": "sent"}),
                             ("splitmq_bytes_total", {"direction": "received"})]:
            assert value(role, after, name, **labels) > value(role, before, name, **labels), (role, name)
        assert value(role, after, "splitmq_batches_total", outcome="applied") == batches
        for name in ("splitmq_loss", "splitmq_in_flight_batches", "splitmq_reconnects_total",
                     "splitmq_last_progress_timestamp_seconds"):
            assert f"{name}{sorted({'job_id': job_id, 'role': role}.items())}" in after[role], (role, name)
        assert value(role, after, "splitmq_rejected_messages_total", reason="decode") == 0
    assert value("worker", after, "splitmq_round_trip_seconds_count") == batches
    assert value("trainer", after, "splitmq_step_seconds_count") == batches
    assert value("worker", after, "splitmq_gradient_staleness_updates_sum") > 0  # two in flight
    assert 0 < value("trainer", after, "splitmq_test_accuracy_ratio") <= 1  # the trainer scored the evaluations
    assert 0 < value("worker", after, "splitmq_test_accuracy_ratio") <= 1   # and told the owner
    assert value("trainer", after, "splitmq_loss") > 0


def test_demo_async_two_owners_with_four_in_flight_reach_local_accuracy(amqp_url: str, job_id: str,
                                                                       tmp_path: Path) -> None:
    # Given the demo's defaults: two data owners, four batches in flight each, bottoms averaged
    # When `splitmq demo --json` runs them as separate processes through the broker
    out = subprocess.run([sys.executable, "-m", "splitmq", "--log-level", "WARNING", "demo", "--json",
                          "--job-id", job_id, "--amqp-url", amqp_url, "--metrics-port-base", "9460",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # Then it prints one JSON summary, the trainer ended by itself, and split is within 1 point of local
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["clients"] == 2 and summary["max_in_flight"] == 4 and summary["epochs"] == 30
    assert summary["trainer_batches"] == 30 * 64 and summary["trainer_exit"] == "done"
    assert abs(summary["split_test_accuracy"] - summary["local_test_accuracy"]) <= 0.01, summary
    assert summary["samples_per_second"] > 0
