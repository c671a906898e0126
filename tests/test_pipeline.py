"""End to end on the real broker: split training reproduces local training."""
from __future__ import annotations

import torch

from shared import local
from shared.config import JobConfig
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
