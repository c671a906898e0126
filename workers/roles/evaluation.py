"""One evaluation pass of a data owner: its test samples through the split model, a window at a time.

The owner sends each test batch forward (``train = False``, ``seq`` = the batch's index,
``eval_batches`` = the pass's size) and the stage with the loss scores it; the answer that
completes the pass carries the pass's metrics (unless that stage keeps them private, as a
U-shaped owner's own head does: then the owner reads them from its head).
"""
from __future__ import annotations

import torch

from splitmq.shared import data, topology, wire
from splitmq.shared.stage import Stage


class EvalPass:
    def __init__(self, epoch: int, test: data.SampleSet, batch_size: int, me: str, job_id: str, *,
                 send_labels: bool, window: int) -> None:
        self.epoch, self.test, self.me, self.job_id = epoch, test, me, job_id
        self.send_labels, self.window = send_labels, window
        self.order = list(torch.split(torch.arange(len(test)), batch_size))
        self.next = 0
        self.pending: set[int] = set()
        self.answered_seqs: set[int] = set()
        self.metrics: dict[str, float] = {}

    def due(self, stage: Stage) -> list[tuple[str, wire.Forward]]:
        """The next evaluation batches to send, keeping at most ``window`` unanswered."""
        out = []
        while self.next < len(self.order) and len(self.pending) < self.window:
            i = self.next
            batch = self.test.batch(self.order[i])
            assert batch.x is not None
            msg = wire.Forward(job_id=self.job_id, client_id=self.me, seq=i, model_version=stage.version,
                               activations=stage.infer(batch.x), labels=batch.y if self.send_labels else None,
                               sample_ids=batch.ids, train=False, epoch=self.epoch, eval_batches=len(self.order))
            out.append((topology.eval_id(self.me, self.epoch, i), msg))
            self.pending.add(i)
            self.next += 1
        return out

    def answered(self, msg: wire.Backward) -> None:
        if msg.seq in self.pending:
            self.pending.discard(msg.seq)
            self.answered_seqs.add(msg.seq)
        if msg.metrics:
            self.metrics = dict(msg.metrics)

    def complete(self) -> bool:
        return len(self.answered_seqs) == len(self.order)
