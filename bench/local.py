"""Part 1: the limit. The whole model trained in one process, no messages at all.

Same model (``build_full``), data, batch size, optimizer and loss as every split contender;
the samples/s here is the denominator of every ratio in the report.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitmq.bench.common import LR, MODELS, Scale, dataset, full_model, set_threads, timed_training


def train_for(model_name: str, seconds: float, *, dataset_name: str, warmup_steps: int = 5) -> dict[str, Any]:
    """Train ``model_name`` for about ``seconds`` after a short warm-up; samples/s of that span."""
    set_threads()
    train = dataset(dataset_name).train
    model = full_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.NLLLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return {"model": model_name, **timed_training(train, step, seconds=seconds, warmup_steps=warmup_steps)}


def run(scale: Scale) -> dict[str, Any]:
    """Local samples/s for every benchmarked model."""
    return {name: train_for(name, scale.seconds, dataset_name=scale.dataset) for name in MODELS}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = ["| model | samples/s | samples timed |", "|---|---:|---:|"]
    for name, r in result.items():
        lines.append(f"| {name} | {r['samples_per_second']:,.0f} | {r['samples']:,} |")
    return lines
