"""The vertical top: joins the parties' parts of each batch by sample id, or gives a batch up.

Every party holds different features of the same samples and walks them in the same order,
so part ``seq`` of every party covers the same sample ids (checked). The top holds the
labels. When all parts are in, it joins them (concatenated or summed), computes the loss,
and answers each party with its slice of the gradient. Policy for a late or missing party
(docs/configurations.md): wait ``timeout_s`` from a batch's first part, then skip the batch;
every party that sent its part gets a ``skipped`` answer and drops its stash; a part that
arrives after its batch was skipped gets the same answer at once.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from splitmq.shared import scores, validate, wire
from splitmq.shared.config import Combine
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.ledger import Ledger
from splitmq.shared.stage import Stage
from splitmq.workers.exits import Wait
from splitmq.workers.roles.base import Inbound, Incoming, Role, Send, Source, Step, ToParty
from splitmq.workers.roles.members import Members
from splitmq.workers.roles.top import Labels
from splitmq.workers.stats import Stats

log = logging.getLogger(__name__)
#: Skipped batch numbers remembered, to answer late parts at once.
SKIPPED_MEMORY = 4096


@dataclass
class _Batch:
    first_seen: float
    parts: dict[int, tuple[wire.Forward, Incoming]] = field(default_factory=dict)


def join(parts: Sequence[torch.Tensor], combine: Combine) -> torch.Tensor:
    if combine is Combine.SUM:
        return torch.stack(list(parts)).sum(0)                       # (B, w)
    return torch.cat(list(parts), dim=1)                             # (B, sum w_i)


def split_gradient(grad: torch.Tensor, widths: Sequence[int], combine: Combine) -> list[torch.Tensor]:
    """Each party's slice of the joined input's gradient (concat), or the whole of it (sum)."""
    if combine is Combine.SUM:
        return [grad for _ in widths]
    return [g.contiguous() for g in torch.split(grad, list(widths), dim=1)]  # (B, w_i) each


class VerticalTopRole(Role):
    name = "top"

    def __init__(self, stage: Stage, *, members: Members, stats: Stats, job_id: str, forward_queue: str,
                 parties: int, combine: Combine, labels: Labels, task: str, batch_size: int,
                 timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.members, self.stats, self.job_id = stage, members, stats, job_id
        self.forward_queue, self.parties, self.combine, self.labels = forward_queue, parties, combine, labels
        self.task, self.batch_size, self.timeout_s, self.clock = task, batch_size, timeout_s, clock
        self.ledger = Ledger()
        self.pending: dict[tuple[bool, int, int], _Batch] = {}   # (train, epoch, seq)
        self.skipped: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.scorers: dict[int, tuple[scores.Scorer, set[int]]] = {}
        self.losses: list[float] = []
        self.last_scores: dict[str, float] = {}

    def inbound(self) -> list[Inbound]:
        return [Inbound(self.forward_queue, Source.FORWARD, frozenset({wire.Kind.FORWARD}), wire.MAX_MESSAGE_BYTES)]

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Forward)
        member = self.members.require(msg.client_id)
        shape = tuple(self.members.model_of(msg.client_id).get("cut_shape") or ())
        if shape:
            validate.check_forward(msg, validate.Limits(self.job_id, shape, self.batch_size))
        if msg.train and msg.seq in self.skipped:
            return self._answer([(msg, inc)], skipped=True)
        key = (msg.train, msg.epoch if not msg.train else 0, msg.seq)
        batch = self.pending.setdefault(key, _Batch(self.clock()))
        others = [m for m, _ in batch.parts.values()]
        if others and (msg.sample_ids is None or others[0].sample_ids is None
                       or not torch.equal(msg.sample_ids, others[0].sample_ids)):
            raise RejectedMessage("shape", f"batch {msg.seq}: sample ids differ between parties")
        batch.parts[member.index] = (msg, inc)
        if len(batch.parts) < self.parties:
            return Step(hold=("part", msg.client_id, key))
        del self.pending[key]
        parts = [batch.parts[i] for i in sorted(batch.parts)]
        step = self._train(parts) if msg.train else self._evaluate(parts)
        step.settle += [("part", m.client_id, key) for m, _ in parts if m is not msg]
        return step

    def _train(self, parts: list[tuple[wire.Forward, Incoming]]) -> Step:
        first = parts[0][0]
        joined = join([m.activations for m, _ in parts], self.combine)         # (B, joined width)
        labels = self.labels.for_batch(first)
        started = time.perf_counter()
        result = self.stage.loss_step(joined, labels)
        self.stats.applied(len(labels), loss=result.loss, step_s=time.perf_counter() - started)
        self.losses.append(result.loss)
        assert result.grad_input is not None
        widths = [m.activations.shape[1] for m, _ in parts]
        sends = []
        for (m, inc), grad in zip(parts, split_gradient(result.grad_input, widths, self.combine)):
            answer = wire.Backward(job_id=self.job_id, client_id=m.client_id, seq=m.seq,
                                   model_version=self.stage.version, grad=grad, loss=result.loss)
            sends.append(Send(ToParty(inc.reply_to or m.client_id), answer, inc.correlation_id))
        return Step(sends=sends, applied=[(m.client_id, m.seq) for m, _ in parts])

    def _evaluate(self, parts: list[tuple[wire.Forward, Incoming]]) -> Step:
        first = parts[0][0]
        labels = self.labels.for_batch(first)
        output = self.stage.infer(join([m.activations for m, _ in parts], self.combine))
        current = self.scorers.get(first.epoch)
        if current is None or first.seq in current[1]:  # a new pass (or the parties restarted this one)
            current = self.scorers[first.epoch] = (scores.Scorer(self.task), set())
        current[1].add(first.seq)
        current[0].update(output, labels, self.stage.eval_loss(output, labels))
        result: dict[str, float] = {}
        if len(current[1]) >= first.eval_batches:
            result = self.last_scores = self.scorers.pop(first.epoch)[0].result()
            self.stats.evaluated(result)
        sends = [Send(ToParty(inc.reply_to or m.client_id),
                      wire.Backward(job_id=self.job_id, client_id=m.client_id, seq=m.seq,
                                    outcome=wire.Outcome.EVALUATED.value, metrics=result), inc.correlation_id)
                 for m, inc in parts]
        return Step(sends=sends, durable=False)

    def _answer(self, parts: list[tuple[wire.Forward, Incoming]], *, skipped: bool) -> Step:
        sends = [Send(ToParty(inc.reply_to or m.client_id),
                      wire.Backward(job_id=self.job_id, client_id=m.client_id, seq=m.seq,
                                    outcome=wire.Outcome.SKIPPED.value), inc.correlation_id) for m, inc in parts]
        return Step(sends=sends, applied=[(m.client_id, m.seq) for m, _ in parts if m.train])

    def tick(self, now: float) -> Step:
        step = Step()
        for key, batch in list(self.pending.items()):
            if now - batch.first_seen <= self.timeout_s:
                continue
            del self.pending[key]
            train, _epoch, seq = key
            log.warning("top: skipping batch %d: %d of %d parties sent their part within %.0fs", seq,
                        len(batch.parts), self.parties, self.timeout_s)
            self.stats.skipped("party_timeout")
            parts = list(batch.parts.values())
            if train:
                self.skipped[seq] = None
                while len(self.skipped) > SKIPPED_MEMORY:
                    self.skipped.popitem(last=False)
            step.add(self._answer(parts, skipped=True))
            step.settle += [("part", m.client_id, key) for m, _ in parts]
        return step

    def waits(self, now: float) -> list[Wait]:
        if not self.pending:
            return []
        key, batch = min(self.pending.items(), key=lambda kv: kv[1].first_seen)
        return [Wait(f"the other parties' parts of batch {key[2]}", batch.first_seen, self.timeout_s, expire=None)]

    def state(self) -> dict[str, Any]:
        return {"stage": self.stage.state(), "skipped": list(self.skipped)}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.stage.load_state(state["stage"])
            self.skipped = collections.OrderedDict((int(s), None) for s in state.get("skipped", []))

    def summary(self) -> dict[str, Any]:
        return {"version": self.stage.version, "losses": self.losses, "test_scores": self.last_scores,
                "skipped": self.stats.counts["skipped"]}
