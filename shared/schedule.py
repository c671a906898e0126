"""Learning-rate schedules, as pure functions of a stage's own update count.

A schedule gives the factor (0..1) applied to the optimizer's peak learning rate. Every
party steps its schedule by its own optimizer updates, and the local baseline does the same,
so a synchronous one-owner run follows local training exactly. A cosine decay to zero makes
the final accuracy stable from epoch to epoch (with a constant rate it swings by a couple of
points here), which is what lets split and local runs be compared fairly.

A stage serving several owners learns how many updates the job has as the owners join
(each tells its batches per epoch), so its total is a callable, not a number.
"""
from __future__ import annotations

import math
from typing import Callable


def make(kind: str, total_steps: Callable[[], int] | int) -> Callable[[int], float]:
    """``step -> factor`` for ``kind``; cosine decays from 1 to 0 over ``total_steps``.

    Raises:
        ValueError: unknown kind.
    """
    total = total_steps if callable(total_steps) else (lambda: total_steps)
    if kind == "constant":
        return lambda step: 1.0
    if kind != "cosine":
        raise ValueError(f"unknown schedule {kind!r}; known: cosine, constant")
    return lambda step: cosine(step, total())


def cosine(step: int, total: int) -> float:
    total = max(1, total)
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
