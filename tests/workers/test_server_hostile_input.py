"""End to end on the real broker: hostile messages injected into the activations queue during a
run are dead-lettered with their reasons, and the run ends with exactly the weights of a
clean run."""
from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any, Callable

import msgpack
import torch

from splitmq.shared import broker, topology, wire
from splitmq.shared.broker import Broker
from splitmq.shared.config import JobConfig
from tests.helpers import TrainerThread, make_worker

WAIT_S = 60.0


def hostile_messages(job: str, cut: tuple[int, ...], batch: int) -> list[tuple[str, bytes]]:
    """(expected reason, body) for each kind of hostile input a client could send."""
    def forward(**changes: Any) -> bytes:
        fields: dict[str, Any] = dict(job_id=job, client_id="client-0", seq=10**5,
                                      activations=torch.zeros(2, *cut), labels=torch.zeros(2, dtype=torch.int64))
        fields.update(changes)
        return wire.Forward(**fields).encode()

    huge = msgpack.packb({"schema": wire.SCHEMA_VERSION, "kind": "forward", "job_id": job, "client_id": "client-0",
                          "seq": 1, "tensors": {"activations": {"dtype": "float32", "shape": [2**40, 2**20],
                                                                "data": b""}}})
    return [
        ("decode", b"\xc1 not msgpack at all"),
        ("decode", huge),  # declares 4 PiB of activations
        ("job", forward(job_id="another-job")),
        ("dtype", forward(activations=torch.zeros(2, *cut, dtype=torch.float64))),
        ("shape", forward(activations=torch.zeros(2, cut[0] + 1))),
        ("batch_size", forward(activations=torch.zeros(batch + 1, *cut),
                               labels=torch.zeros(batch + 1, dtype=torch.int64))),
        ("non_finite", forward(activations=torch.full((2, *cut), math.nan))),
        ("sequence", forward(seq=10**9)),
        ("identity", forward(client_id="client-0.top")),
        ("kind", wire.Backward(job_id=job, client_id="client-0", seq=1, grad=torch.zeros(2, *cut)).encode()),
    ]


def train(cfg: JobConfig, amqp_url: str, inject: Callable[[TrainerThread], None] | None = None
          ) -> dict[str, dict[str, torch.Tensor]]:
    """One split training run; ``inject`` runs in a thread while it trains. Returns both segments' weights."""
    with TrainerThread(cfg, amqp_url) as trainer:
        injector = threading.Thread(target=inject, args=(trainer,)) if inject else None
        if injector:
            injector.start()
        worker = make_worker(cfg, amqp_url, evaluate=False)
        assert worker.run()["completed"]
        if injector:
            injector.join(WAIT_S)
    return {"bottom": worker.stage.segment.state_dict(), "top": trainer.trainer.stage.segment.state_dict()}


def test_hostile_messages_during_a_run_are_dead_lettered_and_change_no_weight(amqp_url: str, job_id: str) -> None:
    # Given a clean reference run of one client
    cfg = JobConfig(job_id=job_id, dataset="synthetic", num_clients=1, epochs=1, max_in_flight=1,
                    bottom_sync="independent")
    clean = train(cfg, amqp_url)
    broker.delete_queues(amqp_url, [topology.forward_queue(job_id), topology.dead_letter_queue(job_id)])

    sent: dict[str, str] = {}

    def inject(trainer: TrainerThread) -> None:
        limits = trainer.trainer.limits
        bodies = hostile_messages(job_id, limits.cut_shape, limits.max_batch)
        deadline = time.monotonic() + WAIT_S
        while trainer.trainer.broker is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the trainer declares the topology as it connects
        admin = Broker(amqp_url, name="hostile")
        admin.start()
        try:
            for i, (reason, body) in enumerate(bodies):
                if i == len(bodies) // 2:  # the rest once training is under way
                    while trainer.trainer.counts["applied"] < 10 and time.monotonic() < deadline:
                        time.sleep(0.01)
                mid = f"hostile-{i}-{uuid.uuid4().hex[:6]}"
                sent[mid] = reason
                admin.publish(topology.activations_exchange(job_id), topology.forward_routing_key("client-0"),
                              body, message_id=mid, reply_to="client-0").result(WAIT_S)
        finally:
            admin.close()

    # When the same run is repeated with hostile messages injected before and during training
    attacked = train(cfg, amqp_url, inject)

    # Then every hostile message sits in the dead-letter queue with its reason
    assert len(sent) == 10
    deadline = time.monotonic() + WAIT_S
    while broker.queue_depth(amqp_url, topology.dead_letter_queue(job_id)) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    dead = broker.get_messages(amqp_url, topology.dead_letter_queue(job_id))
    assert {d.headers["x-splitmq-message-id"]: d.headers["x-splitmq-reason"] for d in dead} == sent
    # And the final weights of both segments are exactly those of the clean run
    for segment in ("bottom", "top"):
        assert clean[segment].keys() == attacked[segment].keys()
        for name, value in clean[segment].items():
            assert torch.equal(value, attacked[segment][name]), f"{segment}.{name} differs"
