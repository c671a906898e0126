"""Learning-rate schedules, as pure functions of a stage's own update count.

Every party steps its schedule by its own optimizer updates, and the local baseline does the
same, so a synchronous one-client run follows local training exactly. A cosine decay to
zero makes the final accuracy stable from epoch to epoch (with a constant rate it swings by
a couple of points here), which is what lets split and local runs be compared fairly.
"""
from __future__ import annotations

import math
from typing import Callable

from splitmq.shared import data
from splitmq.shared.config import JobConfig

SCHEDULES = ("cosine", "constant")


def make(kind: str, *, base_lr: float, total_steps: int) -> Callable[[int], float]:
    """``step -> lr`` for ``kind``; cosine decays from ``base_lr`` to 0 over ``total_steps``.

    Raises:
        ValueError: unknown kind or non-positive total.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if kind == "constant":
        return lambda step: base_lr
    return lambda step: base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def party_steps(cfg: JobConfig, num_train: int, client_index: int | None) -> int:
    """Updates a party makes over the job: a bottom its own batches, the top everyone's.

    ``client_index`` None means a stage that serves every client (top or middle hop).
    """
    if cfg.vertical_parts:
        return cfg.epochs * _batches(num_train, cfg.batch_size)
    indices = range(cfg.num_clients) if client_index is None else [client_index]
    sizes = [len(range(i, num_train, cfg.num_clients)) for i in indices]
    return cfg.epochs * sum(_batches(n, cfg.batch_size) for n in sizes)


def for_party(cfg: JobConfig, client_index: int | None, num_train: int | None = None) -> Callable[[int], float]:
    if num_train is None:
        num_train = len(data.load(cfg.dataset, cfg.data_dir, cfg.test_fraction).train.y)
    return make(cfg.lr_schedule, base_lr=cfg.lr, total_steps=party_steps(cfg, num_train, client_index))
