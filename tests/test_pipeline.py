"""End to end on the real broker: split training reproduces local training."""
from __future__ import annotations

import torch

from splitmq.shared import local
from splitmq.shared.config import JobConfig
from tests.helpers import TrainerThread, make_worker


def test_synchronous_split_training_matches_local_training_step_by_step(amqp_url: str, job_id: str) -> None:
    # Given one client, one batch in flight, a fixed seed, and the same batch order locally
    cfg = JobConfig(job_id=job_id, num_clients=1, epochs=2, max_in_flight=1, bottom_sync="independent")
    reference = local.train_local(cfg)

    # When the same job is trained split across a worker and a trainer through RabbitMQ
    with TrainerThread(cfg, amqp_url) as trainer:
        worker = make_worker(cfg, amqp_url, evaluate=False)
        summary = worker.run()

    # Then every step's loss and the final weights of both segments equal local training's
    assert summary["completed"]
    split_losses = [worker.losses[s] for s in sorted(worker.losses)]
    assert len(split_losses) == len(reference.losses)
    assert max(abs(a - b) for a, b in zip(split_losses, reference.losses)) <= 1e-5
    full = reference.model.state_dict()
    bottom = worker.stage.segment.state_dict()
    top = trainer.trainer.stage.segment.state_dict()
    n_bottom = len(worker.stage.segment)
    for name, value in bottom.items():
        torch.testing.assert_close(value, full[name], atol=1e-5, rtol=0)
    for name, value in top.items():
        index, rest = name.split(".", 1)
        torch.testing.assert_close(value, full[f"{int(index) + n_bottom}.{rest}"], atol=1e-5, rtol=0)


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_both_metrics_endpoints_serve_the_pipeline_metrics_and_they_move(amqp_url: str, job_id: str) -> None:
    import threading

    from splitmq.shared.metrics import serve

    # Given a trainer and a worker each serving /metrics
    cfg = JobConfig(job_id=job_id, num_clients=1, epochs=2, max_in_flight=2, bottom_sync="independent")
    with TrainerThread(cfg, amqp_url) as trainer:
        worker = make_worker(cfg, amqp_url)
        ports = {"trainer": serve(0, trainer.trainer.metrics.registry, "127.0.0.1"),
                 "worker": serve(0, worker.metrics.registry, "127.0.0.1")}
        before = {role: _scrape(port) for role, port in ports.items()}
        # When training runs
        runner = threading.Thread(target=worker.run)
        runner.start()
        runner.join(300)
        after = {role: _scrape(port) for role, port in ports.items()}

    # Then every metric the issue names is there, and the training ones moved
    def value(role: str, snapshot: dict, name: str, **labels: str) -> float:
        return snapshot[role][f"{name}{sorted({'role': role, **labels}.items())}"]

    for role in ("trainer", "worker"):
        for name, labels in [("splitmq_batches_total", {"outcome": "applied"}), ("splitmq_samples_total", {}),
                             ("splitmq_bytes_total", {"direction": "sent"}),
                             ("splitmq_bytes_total", {"direction": "received"})]:
            assert value(role, after, name, **labels) > value(role, before, name, **labels), (role, name)
        for name in ("splitmq_loss", "splitmq_test_accuracy_ratio", "splitmq_in_flight_batches",
                     "splitmq_reconnects_total", "splitmq_round_trip_seconds_count", "splitmq_step_seconds_count",
                     "splitmq_gradient_staleness_updates_count"):
            assert f"{name}{sorted({'role': role}.items())}" in after[role], (role, name)
        assert value(role, after, "splitmq_rejected_messages_total", reason="decode") == 0
    assert value("worker", after, "splitmq_round_trip_seconds_count") == 2 * worker.batches_per_epoch
    assert value("trainer", after, "splitmq_step_seconds_count") == 2 * worker.batches_per_epoch
    assert value("worker", after, "splitmq_gradient_staleness_updates_sum") > 0  # two in flight
    assert 0 < value("worker", after, "splitmq_test_accuracy_ratio") <= 1
    assert value("trainer", after, "splitmq_loss") > 0


def test_demo_async_two_clients_with_four_in_flight_reach_local_accuracy(amqp_url: str, job_id: str,
                                                                        tmp_path) -> None:
    import json
    import subprocess
    import sys

    # Given the demo's defaults: two data owners, four batches in flight each, bottoms averaged
    # When `splitmq demo --json` runs them as separate processes through the broker
    out = subprocess.run([sys.executable, "-m", "splitmq", "--log-level", "WARNING", "demo", "--json",
                          "--job-id", job_id, "--amqp-url", amqp_url, "--metrics-port-base", "9460",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # Then it prints one JSON summary, and split learning is within 1 point of local training
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["clients"] == 2 and summary["max_in_flight"] == 4 and summary["epochs"] == 30
    assert summary["trainer_batches"] == 30 * 64
    assert abs(summary["split_test_accuracy"] - summary["local_test_accuracy"]) <= 0.01, summary
    assert summary["samples_per_second"] > 0
