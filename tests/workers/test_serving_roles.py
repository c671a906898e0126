"""The serving, export and requester roles, called directly (no broker): what each answers, as data."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from splitmq.shared import topology, wire
from splitmq.shared.config import Combine
from splitmq.shared.optim import OptimizerSpec
from splitmq.shared.stage import Stage
from splitmq.workers import consent
from splitmq.workers.roles.base import Incoming, Source, ToParty
from splitmq.workers.roles.export import ExportRole
from splitmq.workers.roles.requests import PredictClient, PredictionError
from splitmq.workers.roles.serving import ServeRole, VerticalServeRole
from splitmq.workers.stats import Stats

JOB = "rolesjob"


def _stage(width: int = 4) -> Stage:
    torch.manual_seed(0)
    return Stage(nn.Linear(width, 2), optimizer=OptimizerSpec("SGD", 0.1, ()))


def _request(x: torch.Tensor | None, *, deadline: float, client: str = "client-0", sender: str = "client-0",
             ids: torch.Tensor | None = None, cid: str = "client-0:predict:1") -> Incoming:
    msg = wire.Predict(job_id=JOB, client_id=client, seq=1, inputs=x, sample_ids=ids, request_id=cid,
                       deadline=deadline)
    return Incoming(msg=msg, source=Source.FORWARD, queue=topology.serve_queue(JOB, "top"), sender=sender,
                    reply_to=sender, correlation_id=cid)


def _answer(step_sends: list) -> wire.Prediction:  # type: ignore[type-arg]
    assert len(step_sends) == 1
    send = step_sends[0]
    assert isinstance(send.msg, wire.Prediction)
    return send.msg


def test_the_top_answers_a_good_request_and_turns_expired_or_malformed_ones_into_errors() -> None:
    # Given the top serving its segment, at wall time 100
    stage = _stage()
    role = ServeRole(stage, job_id=JOB, address="top", stats=Stats(), wall=lambda: 100.0)
    x = torch.randn(3, 4)
    # When a request within its deadline, one past it, and one of the wrong width arrive
    ok = role.handle(_request(x, deadline=130.0))
    late = role.handle(_request(x, deadline=99.0))
    wrong = role.handle(_request(torch.randn(3, 5), deadline=130.0))
    # Then the first gets the segment's outputs, sent to the requester's answer queue
    answer = _answer(ok.sends)
    assert answer.reason == "ok" and torch.equal(answer.outputs, stage.infer(x))
    assert ok.sends[0].route == ToParty(topology.serve_address("client-0")) and not ok.durable
    # And the others get their reason and a readable error, without outputs
    assert _answer(late.sends).reason == "expired" and _answer(late.sends).outputs is None
    assert _answer(wrong.sends).reason == "invalid" and "shape [3, 5]" in _answer(wrong.sends).error


def test_a_vertical_top_asks_the_other_party_and_times_out_naming_it_when_its_part_never_comes() -> None:
    # Given a vertical top of two parties with a 3 s part timeout, and a clock we move
    now = [100.0]
    role = VerticalServeRole(_stage(8), job_id=JOB, address="top", parties=2, combine=Combine.CONCAT,
                             party_name=topology.client_name, index_of=topology.client_index, stats=Stats(),
                             timeout_s=3.0, wall=lambda: now[0], clock=lambda: now[0])
    # When party 0 asks for a prediction of two samples
    step = role.handle(_request(torch.randn(2, 4), deadline=200.0, ids=torch.tensor([7, 9])))
    # Then the top asks party 1 for its part of the same sample ids, on party 1's serving side
    (ask,) = step.sends
    assert isinstance(ask.msg, wire.Predict) and ask.msg.inputs is None and ask.msg.sample_ids.tolist() == [7, 9]
    assert ask.route.dest == topology.serve_address("client-1")  # type: ignore[union-attr]
    # And when 3 s pass without it, party 0 gets a timeout that names party 1, and nothing is left waiting
    now[0] = 103.5
    late = _answer(role.tick(now[0]).sends)
    assert late.reason == "timeout" and "no part from client-1 within 3.0s" in late.error
    assert not role.joins and not role.waits(now[0])


def test_a_holder_exports_its_segment_only_to_a_requester_it_approved(tmp_path: Path) -> None:
    # Given the top's segment and its consent file, with no approval yet
    stage = _stage()
    path = consent.path_for(tmp_path, "top")
    role = ExportRole(job_id=JOB, me="top", segments={1: stage.segment}, consent_path=path)
    msg = wire.Export(job_id=JOB, client_id="client-0", seq=0, request_id="e", segment=1)
    inc = Incoming(msg=msg, source=Source.FORWARD, queue=topology.serve_queue(JOB, "top"), sender="client-0",
                   reply_to="client-0", correlation_id="e")
    # When client-0 asks before and after the top approved it (and client-1 asks after)
    refused = role.handle(inc).sends[0].msg
    consent.approve(path, holder="top", job_id=JOB, requester="client-0")
    granted = role.handle(inc).sends[0].msg
    other = role.handle(Incoming(msg=msg.copy(client_id="client-1"), source=Source.FORWARD, queue=inc.queue,
                                 sender="client-1", reply_to="client-1", correlation_id="e")).sends[0].msg
    # Then only the approved requester gets the weights; the refusals name the holder and the command to run
    assert isinstance(refused, wire.Segment) and not refused.tensors
    assert "not approved: top has not approved" in refused.error and "approve-export" in refused.error
    assert isinstance(granted, wire.Segment) and not granted.error
    assert torch.equal(granted.tensors["weight"], stage.segment.weight)
    assert isinstance(other, wire.Segment) and "to client-1" in other.error


def test_a_request_nobody_serves_fails_at_once_as_unavailable() -> None:
    # Given an owner's requester whose first stage is not serving
    client = PredictClient(_stage(), job_id=JOB, me="client-0", dest="top", stats=Stats(), timeout_s=5.0)
    future = client.submit(torch.randn(2, 4))
    (send,) = client.tick(0.0).sends
    # When the broker returns the request as unroutable
    client.on_unroutable(send, 0.1)
    # Then the caller gets the reason at once, not after the deadline
    with pytest.raises(PredictionError, match="unavailable: nobody serves top"):
        future.result(timeout=1)
    assert client.stats.counts["inference_unavailable"] == 1


def test_a_request_its_predictor_loop_never_settles_ends_as_a_timeout_naming_the_loop(monkeypatch: Any) -> None:
    # Given a predictor whose loop ended (or hangs) with a request still unanswered
    from concurrent.futures import Future
    from types import SimpleNamespace

    from splitmq.shared import defaults
    from splitmq.workers.exits import ExitReason
    from splitmq.workers.party import Outcome
    from splitmq.workers.predict import Predictor
    from splitmq.workers.roles.requests import PredictionError
    monkeypatch.setattr(defaults, "PREDICT_GRACE_S", 0.2)
    p = object.__new__(Predictor)
    p.client, p.outcome = SimpleNamespace(timeout_s=0.1), None  # type: ignore[assignment]
    unanswered: Future[torch.Tensor] = Future()
    # When its caller waits for the outputs
    with pytest.raises(PredictionError) as stuck:
        p.outputs(unanswered)
    p.outcome = Outcome(ExitReason.BROKER_UNAVAILABLE, "the broker went away", {})
    with pytest.raises(PredictionError) as ended:
        p.outputs(unanswered)
    # Then the wait ends past the request's deadline as a timeout that says what the loop did
    assert stuck.value.reason == "timeout" and "did not settle it" in stuck.value.detail
    assert ended.value.reason == "timeout" and "the broker went away" in ended.value.detail
