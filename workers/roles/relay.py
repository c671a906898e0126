"""A middle hop: forward the batch on through this segment, relay the gradient back.

The incoming batch is held (unacknowledged) until the next stage answers; then this stage
applies its own update, answers the owner with the gradient of its input, and the batch is
done. After a crash, the next stage's answers may arrive before the batches they answer
are redelivered: such an answer is kept (also unacknowledged) and applied when its batch
comes, without sending the batch on again. A U-shaped run's middle sends each batch to the
owner's own head (``next_stage`` gives the stage per owner).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from splitmq.shared import defaults, topology, validate, wire
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.ledger import Ledger
from splitmq.shared.stage import Stage
from splitmq.workers.exits import ExitReason, PartyExit, Wait
from splitmq.workers.roles.base import IfUnroutable, Inbound, Incoming, Role, Send, Source, Step, ToParty, ToStage
from splitmq.workers.roles.members import Members
from splitmq.workers.stats import Stats


@dataclass
class _Passed:
    """A batch sent on, waiting for the next stage's answer."""

    inc: Incoming
    client: str
    seq: int
    train: bool
    onward: wire.Forward
    sent_at: float
    duplicate_at: float | None = None


class RelayRole(Role):
    """Forward through the segment to the next stage; backward when it answers."""

    name = "relay"

    def __init__(self, stage: Stage, *, members: Members, stats: Stats, job_id: str, me: str,
                 forward_queue: str, reply_queue: str, next_stage: Callable[[str], str],
                 limits: Callable[[], validate.Limits | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.members, self.stats, self.job_id, self.me = stage, members, stats, job_id, me
        self.forward_queue, self.reply_queue, self.next_stage, self.limits = (forward_queue, reply_queue,
                                                                              next_stage, limits)
        self.clock = clock
        self.ledger = Ledger()
        self.passed: dict[str, _Passed] = {}                      # by the correlation id we gave
        self.early: dict[tuple[str, int], wire.Backward] = {}     # answers that came before their batch

    def inbound(self) -> list[Inbound]:
        return [Inbound(self.forward_queue, Source.FORWARD, frozenset({wire.Kind.FORWARD}), self._max_body),
                Inbound(self.reply_queue, Source.REPLY, frozenset({wire.Kind.BACKWARD}), wire.MAX_MESSAGE_BYTES)]

    def handle(self, inc: Incoming) -> Step:
        if inc.source is Source.FORWARD:
            assert isinstance(inc.msg, wire.Forward)
            return self._forward(inc, inc.msg)
        assert isinstance(inc.msg, wire.Backward)
        return self._answer(inc, inc.msg)

    def _max_body(self) -> int:
        limits = self.limits()
        return limits.max_body_bytes() if limits is not None else wire.MAX_MESSAGE_BYTES

    def _forward(self, inc: Incoming, msg: wire.Forward) -> Step:
        self.members.require(msg.client_id)
        limits = self.limits()
        if limits is not None:
            validate.check_forward(msg, limits)
        cid = topology.relay_id(inc.correlation_id, self.me)
        if cid in self.passed:  # the owner sent it again: pass the re-send on, keep waiting
            p = self.passed[cid]
            return Step(sends=[self._onward(p.onward.copy(attempt=msg.attempt), cid)], durable=False)
        key = (msg.client_id, msg.seq)
        if msg.train:
            output = self.stage.forward(key, msg.activations)
            early = self.early.pop(key, None)
            if early is not None:  # replaying after a restart: the next stage answered already
                step = self._apply(_Passed(inc, msg.client_id, msg.seq, True, msg, self.clock()), early)
                step.settle.append(("early", key))
                step.hold = None
                return step
        else:
            output = self.stage.infer(msg.activations)
        onward = msg.copy(activations=output, model_version=self.stage.version)
        self.passed[cid] = _Passed(inc, msg.client_id, msg.seq, msg.train, onward, self.clock())
        self.stats.gauge("in_flight", len(self.passed))
        return Step(sends=[self._onward(onward, cid)], hold=("passed", cid))

    def _onward(self, msg: wire.Forward, cid: str) -> Send:
        return Send(ToStage(self.next_stage(msg.client_id)), msg, cid, if_unroutable=IfUnroutable.RETRY)

    def _answer(self, inc: Incoming, msg: wire.Backward) -> Step:
        p = self.passed.get(inc.correlation_id)
        if p is None:
            if msg.outcome == wire.Outcome.APPLIED.value and not self.stage.holds((msg.client_id, msg.seq)):
                self.early[(msg.client_id, msg.seq)] = msg  # its batch has not come back to us yet
                return Step(hold=("early", (msg.client_id, msg.seq)))
            return Step(durable=False)  # an answer to something we already finished
        if msg.outcome == wire.Outcome.DUPLICATE.value:
            p.duplicate_at = p.duplicate_at or self.clock()
            return Step(durable=False)
        del self.passed[inc.correlation_id]
        self.stats.gauge("in_flight", len(self.passed))
        if msg.outcome == wire.Outcome.APPLIED.value and p.train:
            step = self._apply(p, msg)
        else:
            if p.train:
                self.stage.discard((p.client, p.seq))
            answer = msg.copy(client_id=p.client, model_version=self.stage.version)
            step = Step(sends=[Send(ToParty(p.inc.reply_to or p.client), answer, p.inc.correlation_id)])
            step.durable = msg.outcome != wire.Outcome.SKIPPED.value or not p.train
            if msg.outcome == wire.Outcome.SKIPPED.value and p.train:
                step.applied.append((p.client, p.seq))
        step.settle.append(("passed", inc.correlation_id))
        return step

    def _apply(self, p: _Passed, msg: wire.Backward) -> Step:
        key = (p.client, p.seq)
        try:
            grad = validate.check_gradient(msg.grad, self.stage.output_shape(key))
        except RejectedMessage as exc:
            raise PartyExit(ExitReason.PEER_FAULT, f"the next stage's gradient for {p.client} batch {p.seq}: "
                            f"{exc.detail}", reject_reason=exc.reason) from None
        started = time.perf_counter()
        grad_input, staleness = self.stage.backward(key, grad)
        self.stats.applied(len(grad), loss=msg.loss, staleness=staleness, step_s=time.perf_counter() - started)
        answer = wire.Backward(job_id=self.job_id, client_id=p.client, seq=p.seq, model_version=self.stage.version,
                               grad=grad_input, loss=msg.loss, metrics=msg.metrics)
        return Step(sends=[Send(ToParty(p.inc.reply_to or p.client), answer, p.inc.correlation_id)],
                    applied=[key])

    def waits(self, now: float) -> list[Wait]:
        dup = [p for p in self.passed.values() if p.duplicate_at is not None]
        if not dup:
            return []
        p = min(dup, key=lambda q: q.duplicate_at or 0.0)
        return [Wait(f"the gradient of {p.client} batch {p.seq}, which the next stage applied before",
                     p.duplicate_at or now, defaults.DUPLICATE_WAIT_S, ExitReason.STATE_MISMATCH,
                     "this stage's checkpoint is older than what it acknowledged (another --checkpoint-dir?)")]

    def state(self) -> dict[str, Any]:
        return {"stage": self.stage.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.stage.load_state(state["stage"])

    def summary(self) -> dict[str, Any]:
        return {"version": self.stage.version}
