"""``delivery = transient``: what it declares and publishes, and that lost batches and answers are sent again.

The in-memory broker loses chosen non-persistent publishes after confirming them (what a broker
restart does to a transient job's queues); the real broker's restart is tests/test_transient_broker.py.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest
import torch

from splitmq.shared import codec, topology, wire
from splitmq.shared.config import Delivery, JobConfig
from splitmq.shared.errors import ConfigError
from splitmq.shared.transport import StubBroker
from splitmq.workers.answers import Answers
from splitmq.workers.exits import ExitReason
from splitmq.workers.outbox import Outbox
from splitmq.workers.roles.base import Send, Step, ToParty, ToStage
from splitmq.workers.roles.owner_waits import OwnerTimeouts
from splitmq.workers.stats import Stats
from tests.stubs import Client, forward, owner_spec, start_server, start_worker

JOB = "transientjob"


def test_a_transient_job_declares_its_forward_and_reply_queues_classic_and_the_rest_quorum() -> None:
    layout = topology.with_replicas(topology.job_layout(JOB, parties=("client-0",), serving=("top",)), 3)
    kinds = {q.name.split(".")[2]: q.arguments for q in topology.with_delivery(layout, "transient").queues}
    for kind in ("forward", "reply"):
        assert kinds[kind]["x-queue-type"] == "classic"
        assert not {"x-quorum-initial-group-size", "x-delivery-limit", "x-dead-letter-strategy"} & set(kinds[kind])
        assert kinds[kind]["x-dead-letter-exchange"] == topology.dead_letter_exchange(JOB)  # refusals still kept
    assert {kinds[k]["x-queue-type"] for k in ("dlq", "serve", "answers")} == {"quorum"}
    assert topology.with_delivery(layout, "durable") == layout


def test_transient_delivery_is_refused_where_nothing_would_send_a_lost_message_again() -> None:
    with pytest.raises(ConfigError, match="delivery = transient is for one stage"):
        JobConfig(job_id=JOB, delivery=Delivery.TRANSIENT, stages=("middle", "top"))
    with pytest.raises(ConfigError, match="max_in_flight <= 64"):
        JobConfig(job_id=JOB, delivery=Delivery.TRANSIENT, max_in_flight=65)
    assert JobConfig(job_id=JOB, delivery=Delivery.TRANSIENT).agreed()["delivery"] == "transient"


class _Recorder:
    """A transport that keeps whether each publish was persistent, and confirms it at once."""

    def __init__(self) -> None:
        self.persistent: list[bool] = []

    def publish(self, exchange: str, routing_key: str, body: bytes, **props: Any) -> Future[None]:
        self.persistent.append(props["persistent"])
        done: Future[None] = Future()
        done.set_result(None)
        return done


@pytest.mark.parametrize("transient", [False, True])
def test_only_training_batches_and_their_answers_are_published_non_persistent(transient: bool) -> None:
    rec = _Recorder()
    box = Outbox(rec, codec.CutCodec.for_spec({}), name="client-0", job_id=JOB, user_id=None,  # type: ignore[arg-type]
                 stats=Stats(), clock=lambda: 0.0, coalesce=4, transient=transient)
    act = torch.zeros(2, 3)
    batch = [Send(ToStage("top"), wire.Forward(job_id=JOB, client_id="client-0", seq=s, activations=act), f"b{s}")
             for s in range(3)]
    for send in batch:       # three training batches: one bundle
        box.publish(send)
    box.flush()
    box.publish(Send(ToStage("top"), wire.Forward(job_id=JOB, client_id="client-0", seq=0, activations=act,
                                                  train=False), "e0"))
    box.flush()              # an evaluation batch: not sent again, so kept on disk
    box.publish(Send(ToStage("top"), wire.Hello(job_id=JOB, client_id="client-0", seq=0), "h"))
    box.publish(Send(ToParty("client-0"), wire.Backward(job_id=JOB, client_id="client-0", seq=0, grad=act), "b0"))
    box.flush()
    assert rec.persistent == ([False, True, True, False] if transient else [True] * 4)


def _answer(seq: int, client: str = "client-0") -> Step:
    msg = wire.Backward(job_id=JOB, client_id=client, seq=seq, grad=torch.full((1, 2), float(seq)))
    return Step(sends=[Send(ToParty(client), msg, f"b{seq}")], applied=[(client, seq)])


def test_the_trainer_keeps_each_owners_newest_answers_and_forgets_older_ones() -> None:
    answers = Answers(kept=3)
    for seq in (0, 2, 1, 3, 4):
        answers.keep(_answer(seq))
    answers.keep(_answer(0, client="client-1"))
    evaluated = wire.Backward(job_id=JOB, client_id="client-0", seq=9, outcome=wire.Outcome.EVALUATED.value)
    answers.keep(Step(sends=[Send(ToParty("client-0"), evaluated, "e9")]))  # applies nothing: not kept
    assert [s for s in range(10) if answers.get("client-0", s) is not None] == [2, 3, 4]
    kept = answers.get("client-0", 3)
    assert kept is not None and kept.grad is not None and float(kept.grad[0, 0]) == 3.0
    assert answers.get("client-1", 0) is not None and len(answers) == 4


def _train(delivery: Delivery, lost: set[int], **cfg: Any) -> tuple[dict[str, Any], list[str]]:
    """One owner and its trainer on the in-memory broker, losing the ``lost``-th transient publishes
    of each kind (batches up, answers down)."""
    config = JobConfig(job_id=JOB, epochs=1, data="synthetic", delivery=delivery, **cfg)
    hub, counts, dropped = StubBroker(), {"activations": 0, "gradients": 0}, []

    def lose(exchange: str, routing_key: str, body: bytes) -> bool:
        kind = exchange.split(".")[-1]
        counts[kind] += 1
        if counts[kind] in lost:
            dropped.append(kind)
            return True
        return False
    hub.lose = lose
    srv = start_server(hub, config)
    running = start_worker(hub, config, timeouts=OwnerTimeouts(resend_after_s=0.3))
    owner = running.wait()
    top, bottom = srv.roles[1], running.roles[0]
    assert owner.reason is ExitReason.DONE and owner.summary["completed"], owner.detail
    total = owner.summary["batches"]
    # each batch applied exactly once on each side
    assert top.ledger.count("client-0") == total and top.stage.version == total
    assert bottom.ledger.count("client-0") == total and bottom.stage.version == total
    assert srv.wait().reason is ExitReason.DONE
    return {**{f"top.{k}": v for k, v in top.stage.segment.state_dict().items()},
            **{f"bottom.{k}": v for k, v in bottom.stage.segment.state_dict().items()}}, dropped


def test_batches_and_answers_a_transient_broker_lost_are_sent_again_and_training_ends_as_if_none_was_lost() -> None:
    lost = {3, 8, 12}
    clean, _ = _train(Delivery.DURABLE, set())
    transient, dropped = _train(Delivery.TRANSIENT, lost)
    # Then both kinds were lost (batches on their way up, answers on their way down), each sent again
    assert len(dropped) == 2 * len(lost) and {"activations", "gradients"} <= set(dropped)
    # and, one batch in flight, the trained top is the lossless run's bit for bit
    for name, value in clean.items():
        assert torch.equal(value, transient[name]), name


def test_with_batches_in_flight_and_bundles_every_batch_lost_is_applied_exactly_once() -> None:
    _, dropped = _train(Delivery.TRANSIENT, {2, 5, 9}, max_in_flight=4)
    assert len(dropped) == 6 and {"activations", "gradients"} <= set(dropped)


@pytest.mark.parametrize("delivery", list(Delivery))
def test_a_trainer_that_lost_updates_ends_naming_them_not_done(delivery: Delivery) -> None:
    # Given a trainer that applied batches 0 and 2 of an owner, not 1 (it restarted from a checkpoint
    # without batch 1, whose redelivery was lost: a transient job's broker restarting at the same time,
    # or a durable job's forward dead-lettered after the broker's delivery limit)
    cfg = JobConfig(job_id=JOB, epochs=1, data="synthetic", delivery=delivery)
    hub = StubBroker()
    srv = start_server(hub, cfg)
    client = Client(hub, cfg)
    assert client.hello(owner_spec(cfg), batches_per_epoch=3).error == ""
    for seq in (0, 2):
        client.send(forward(cfg, seq), topology.batch_id("client-0", seq))
    # When the owner leaves having applied all three
    client.send(wire.Bye(job_id=JOB, client_id="client-0", seq=3), topology.request_id("client-0", "bye", 0))
    # Then the trainer ends saying which updates it lacks, not "done"
    outcome = srv.wait()
    assert outcome.reason is ExitReason.STATE_MISMATCH and "client-0's batches [1]" in outcome.detail
