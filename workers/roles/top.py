"""The top: the last stage, which holds the loss (and, with ``label_source = top``, the labels).

For a training batch it computes the loss, updates its segment and answers with the
gradient of the activations; for an evaluation batch it scores the output and, when the
owner's evaluation pass is complete, answers with the pass's task metrics. With
``private`` (a U-shaped owner's own head) neither loss nor metrics ever leave.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from splitmq.shared import scores, validate, wire
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.label_protection import GradientProtection, NoProtection
from splitmq.shared.ledger import Ledger
from splitmq.shared.stage import Stage
from splitmq.workers.roles.base import Inbound, Incoming, Role, Send, Source, Step, ToParty
from splitmq.workers.roles.members import Members
from splitmq.workers.stats import Stats


@dataclass
class _Pass:
    scorer: scores.Scorer
    seen: set[int] = field(default_factory=set)


class Labels:
    """Where the loss gets its labels: from the batch, or from this party's own table by sample id."""

    def __init__(self, values: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> None:
        self._index: dict[int, int] | None = None
        self._values = values
        if values is not None and ids is not None:
            self._index = {int(i): p for p, i in enumerate(ids)}

    def for_batch(self, msg: wire.Forward) -> torch.Tensor:
        """The labels of ``msg``'s samples.

        Raises:
            RejectedMessage: labels missing from the batch, or sample ids this party has no label for.
        """
        if self._index is None or self._values is None:
            if msg.labels is None:
                raise RejectedMessage("shape", "labels missing (the data owner holds the labels: label_source batch)")
            return msg.labels
        if msg.sample_ids is None:
            raise RejectedMessage("shape", "sample ids missing (labels are looked up by id: label_source top)")
        try:
            rows = [self._index[int(i)] for i in msg.sample_ids]
        except KeyError as exc:
            raise RejectedMessage("shape", f"no label for sample id {exc.args[0]}") from None
        return self._values[torch.tensor(rows)]


class TopRole(Role):
    """Loss, update and gradient for training batches; scores for evaluation batches."""

    name = "top"

    def __init__(self, stage: Stage, *, members: Members, stats: Stats, job_id: str, forward_queue: str,
                 limits: Callable[[], validate.Limits | None], labels: Labels, task: str,
                 private: bool = False, own_head: bool = False,
                 protection: GradientProtection = NoProtection()) -> None:
        self.stage, self.members, self.stats, self.job_id = stage, members, stats, job_id
        self.forward_queue, self.limits, self.labels, self.task = forward_queue, limits, labels, task
        self.private = private
        self.protection = protection  # what the returned gradient may reveal of the labels (label_protection)
        self.own_head = own_head  # a U-shaped owner's head: its loss is the owner's; its bottom counts the batch
        self.ledger = Ledger()
        self.passes: dict[tuple[str, int], _Pass] = {}
        self.losses: list[float] = []
        self.last_scores: dict[str, float] = {}

    def inbound(self) -> list[Inbound]:
        return [Inbound(self.forward_queue, Source.FORWARD, frozenset({wire.Kind.FORWARD}), self._max_body)]

    def _max_body(self) -> int:
        limits = self.limits()
        return limits.max_body_bytes() if limits is not None else wire.MAX_MESSAGE_BYTES

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Forward)
        self.members.require(msg.client_id)
        limits = self.limits()
        if limits is not None:
            validate.check_forward(msg, limits)
        labels = self.labels.for_batch(msg)
        return self._train(inc, msg, labels) if msg.train else self._evaluate(inc, msg, labels)

    def _train(self, inc: Incoming, msg: wire.Forward, labels: torch.Tensor) -> Step:
        started = time.perf_counter()
        try:
            result = self.stage.loss_step(msg.activations, labels)
        except (IndexError, RuntimeError, ValueError) as exc:  # the loss cannot use these labels
            raise RejectedMessage("shape", f"the loss cannot take this batch's labels: {exc}") from None
        if self.own_head:
            self.stats.loss(result.loss)
        else:
            self.stats.applied(len(labels), loss=result.loss, step_s=time.perf_counter() - started)
        self.losses.append(result.loss)
        self.stats.gauge("epoch", msg.epoch)
        if self.stage.version % 10 == 0:
            self.stats.history(version=self.stage.version, loss=result.loss, samples=self.stats.counts["samples"])
        grad = result.grad_input
        answer = wire.Backward(job_id=self.job_id, client_id=msg.client_id, seq=msg.seq,
                               model_version=self.stage.version,
                               grad=self.protection.protect(grad, labels) if grad is not None else None,
                               loss=None if self.private else result.loss)
        return Step(sends=[Send(ToParty(inc.reply_to or msg.client_id), answer, inc.correlation_id)],
                    applied=[(msg.client_id, msg.seq)])

    def _evaluate(self, inc: Incoming, msg: wire.Forward, labels: torch.Tensor) -> Step:
        output = self.stage.infer(msg.activations)
        key = (msg.client_id, msg.epoch)
        current = self.passes.get(key)
        if current is None or msg.seq in current.seen:  # a new pass (or the owner restarted this one)
            current = self.passes[key] = _Pass(scores.Scorer(self.task))
        current.seen.add(msg.seq)
        current.scorer.update(output, labels, self.stage.eval_loss(output, labels))
        result: dict[str, float] = {}
        if len(current.seen) >= msg.eval_batches:
            result = current.scorer.result()
            del self.passes[key]
            self.last_scores = result
            self.stats.evaluated(result)
            self.stats.history(version=self.stage.version, client=msg.client_id, epoch=msg.epoch,
                               **{f"test_{k}": v for k, v in result.items()})
        answer = wire.Backward(job_id=self.job_id, client_id=msg.client_id, seq=msg.seq,
                               model_version=self.stage.version, outcome=wire.Outcome.EVALUATED.value,
                               metrics={} if self.private else result)
        return Step(sends=[Send(ToParty(inc.reply_to or msg.client_id), answer, inc.correlation_id)], durable=False)

    def state(self) -> dict[str, Any]:
        return {"stage": self.stage.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.stage.load_state(state["stage"])

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.stats.quantiles(self.stats.step_seconds)
        return {"version": self.stage.version, "losses": self.losses, "test_scores": self.last_scores,
                "step_p50_s": p50, "step_p99_s": p99}
