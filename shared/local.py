"""The unsplit baseline: the same model, data, batch order and optimizer in one process.

Split training is judged against this: a synchronous one-client run must reproduce its
per-step losses and final weights, and asynchronous runs must come close in accuracy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitmq.shared import data, models, schedule
from splitmq.shared.config import JobConfig


@dataclass(frozen=True)
class LocalResult:
    model: nn.Module
    losses: list[float]
    test_accuracy: float
    samples_per_second: float


def accuracy(model: nn.Module, split: data.Split, batch_size: int = 1024) -> float:
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum())
                      for x, y in zip(split.x.split(batch_size), split.y.split(batch_size)))
    return correct / len(split.y)


def train_local(cfg: JobConfig, dataset: data.Dataset | None = None, *, client_index: int = 0,
                num_clients: int = 1) -> LocalResult:
    """Train the unsplit model on shard ``client_index`` of ``num_clients`` (default: all data),
    with the batch order a worker with that index uses."""
    dataset = dataset or data.load(cfg.dataset, cfg.data_dir, cfg.test_fraction)
    train = data.shard(dataset.train, client_index, num_clients)
    model: nn.Module = (models.VerticalModel(cfg.vertical_parts, cfg.seed) if cfg.vertical_parts
                        else models.build_full(cfg.model, cfg.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    steps_per_epoch = len(data.batch_order(len(train.y), cfg.batch_size, 0, 0))
    lr_at = schedule.make(cfg.lr_schedule, base_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    losses: list[float] = []
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        for idx in data.batch_order(len(train.y), cfg.batch_size, cfg.seed + client_index, epoch):
            loss = F.nll_loss(model(train.x[idx]), train.y[idx])
            optimizer.zero_grad()
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(len(losses))
            optimizer.step()
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    return LocalResult(model, losses, accuracy(model, dataset.test), cfg.epochs * len(train.y) / seconds)
