"""End to end on the real broker: hostile messages injected into the trainer's queue during a
run are dead-lettered with their reasons, and the run ends with exactly the weights of a
clean run."""
from __future__ import annotations

import math
import threading
import uuid
from typing import Any, Callable

import msgpack
import torch

from splitmq.shared import amqp, topology, wire
from splitmq.shared.broker import Broker
from splitmq.shared.config import BottomSync, JobConfig
from splitmq.workers.exits import ExitReason
from tests.helpers import in_thread, wait_for
from tests.stubs import Running

WAIT_S = 120.0


def hostile_messages(job: str, cut: tuple[int, ...], batch: int) -> list[tuple[str, bytes]]:
    """(expected reason, body) for each kind of hostile input a client could send."""
    def forward(**changes: Any) -> bytes:
        fields: dict[str, Any] = dict(job_id=job, client_id="client-0", seq=10**3,
                                      activations=torch.zeros(2, *cut), labels=torch.zeros(2, dtype=torch.int64))
        fields.update(changes)
        return wire.Forward(**fields).encode()

    huge = msgpack.packb({"schema": wire.SCHEMA_VERSION, "kind": "forward", "job_id": job, "client_id": "client-0",
                          "seq": 1, "tensors": {"activations": {"dtype": "float32", "shape": [2**40, 2**20],
                                                                "data": b""}}})
    return [
        ("decode", b"\xc1 not msgpack at all"),
        ("decode", huge),  # declares 4 PiB of activations
        ("size", b"\x00" * (1 << 20)),  # bigger than any batch of this job: refused unread
        ("job", forward(job_id="another-job")),
        ("dtype", forward(activations=torch.zeros(2, *cut, dtype=torch.float64))),
        ("shape", forward(activations=torch.zeros(2, cut[0] + 1))),
        ("batch_size", forward(activations=torch.zeros(batch + 1, *cut),
                               labels=torch.zeros(batch + 1, dtype=torch.int64))),
        ("non_finite", forward(activations=torch.full((2, *cut), math.nan))),
        ("sequence", forward(seq=10**9)),
        ("identity", forward(client_id="client-0.top")),
        ("kind", wire.Backward(job_id=job, client_id="client-0", seq=1, grad=torch.zeros(2, *cut)).encode()),
        ("shape", forward(labels=torch.full((2,), 99, dtype=torch.int64))),  # a class the model does not have
    ]


def train(cfg: JobConfig, amqp_url: str, inject: Callable[[Running], None] | None = None
          ) -> dict[str, dict[str, torch.Tensor]]:
    """One split run; ``inject`` runs in a thread once the owner has joined. Returns both segments."""
    top = in_thread("server", cfg, amqp_url)
    owner = in_thread("worker", cfg, amqp_url, evaluate=False)
    injector = threading.Thread(target=inject, args=(top,)) if inject else None
    if injector:
        wait_for(lambda: top.roles[1].members.model, "the owner's join")
        injector.start()
    assert owner.wait().reason is ExitReason.DONE
    if injector:
        injector.join(WAIT_S)
    assert top.wait().reason is ExitReason.DONE
    return {"bottom": owner.roles[0].stage.segment.state_dict(), "top": top.roles[1].stage.segment.state_dict()}


def test_hostile_messages_during_a_run_are_dead_lettered_and_change_no_weight(amqp_url: str, job_id: str) -> None:
    # Given a clean reference run of one owner
    cfg = JobConfig(job_id=job_id, data="synthetic", epochs=1, bottom_sync=BottomSync.INDEPENDENT)
    clean = train(cfg, amqp_url)
    amqp.delete_queues(amqp_url, [topology.forward_queue(job_id), topology.dead_letter_queue(job_id)])
    sent: dict[str, str] = {}

    def inject(top: Running) -> None:
        bodies = hostile_messages(job_id, (640,), cfg.batch_size)
        admin = Broker(amqp_url, name="hostile")
        admin.start()
        admin.wait_ready(WAIT_S)
        try:
            for i, (reason, body) in enumerate(bodies):
                if i == len(bodies) // 2:  # the rest once training is under way
                    wait_for(lambda: top.stats.counts["applied"] >= 10, "training under way", WAIT_S)
                mid = f"hostile-{i}-{uuid.uuid4().hex[:6]}"
                sent[mid] = reason
                admin.publish(topology.activations_exchange(job_id), topology.forward_routing_key("client-0"),
                              body, message_id=mid, correlation_id=mid, reply_to="client-0").result(WAIT_S)
        finally:
            admin.close()

    # When the same run is repeated with hostile messages injected while it trains
    attacked = train(cfg, amqp_url, inject)

    # Then every hostile message sits in the dead-letter queue with its reason
    assert len(sent) == 12
    wait_for(lambda: amqp.queue_depth(amqp_url, topology.dead_letter_queue(job_id)) >= len(sent),
             "every dead letter", WAIT_S)
    dead = amqp.get_messages(amqp_url, topology.dead_letter_queue(job_id))
    assert {d.headers["x-splitmq-message-id"]: d.headers["x-splitmq-reason"] for d in dead} == sent
    # And the final weights of both segments are exactly those of the clean run
    for segment in ("bottom", "top"):
        assert clean[segment].keys() == attacked[segment].keys()
        for name, value in clean[segment].items():
            assert torch.equal(value, attacked[segment][name]), f"{segment}.{name} differs"
