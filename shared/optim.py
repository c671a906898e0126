"""Optimizers by name: any ``torch.optim`` class (or the user's own by import path) with kwargs.

Every party of a job uses the same optimizer settings for its own segment, so that a split
run reproduces the unsplit model trained with that optimizer. The learning rate is scaled
by the job's schedule at each step (``shared.schedule``); ``lr`` is its peak.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from splitmq.shared.loader import load_object

#: Optimizers whose state makes a stale gradient (several batches in flight) harmful: measured
#: to diverge on the MNIST MLP with momentum 0.9 and 2 in flight (docs/configurations.md).
MOMENTUM_KEYS = ("momentum", "nesterov")


@dataclass(frozen=True)
class OptimizerSpec:
    """``name``: a ``torch.optim`` class name (``SGD``, ``AdamW``, ...) or ``package.module:Class``."""

    name: str = "SGD"
    lr: float = 0.03
    args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.cls()  # fail at configuration time, not at the first step

    def cls(self) -> type[torch.optim.Optimizer]:
        """The optimizer class.

        Raises:
            ValueError: no such class in torch.optim, or an import path that gives no Optimizer.
        """
        if ":" in self.name:
            cls = load_object(self.name, what="optimizer")
        else:
            match = {n.lower(): n for n in dir(torch.optim)}.get(self.name.lower())
            cls = getattr(torch.optim, match) if match else None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"optimizer {self.name!r} is not a torch.optim optimizer (e.g. SGD, Adam, AdamW)")
        return cls

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        cls: Any = self.cls()  # an Optimizer subclass: each takes its own keyword arguments
        optimizer: torch.optim.Optimizer = cls(params, lr=self.lr, **dict(self.args))
        return optimizer

    @property
    def uses_momentum(self) -> bool:
        """SGD-style momentum (Adam's moments are normalised and measured harmless at K > 1)."""
        args = dict(self.args)
        return any(float(args.get(k, 0) or 0) > 0 for k in MOMENTUM_KEYS)

    def describe(self) -> dict[str, Any]:
        """Plain values for the job fingerprint."""
        return {"name": self.cls().__name__, "lr": self.lr, **{k: v for k, v in self.args}}
