"""The loss of the last stage: a built-in by name, or the user's own callable by import path.

A loss takes the last stage's output and the batch's labels and returns a scalar tensor.
The built-ins adapt the labels to what each loss wants (class indices for the
classification losses, float targets shaped like the output for the others), so the same
label tensor works whatever the task.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from splitmq.shared.loader import load_object

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _targets_like(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return labels.to(output.dtype).reshape(output.shape)


def cross_entropy(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) and class indices (B,)."""
    return F.cross_entropy(output, labels.long())


def nll(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (B, C) and class indices (B,)."""
    return F.nll_loss(output, labels.long())


def bce_with_logits(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One logit per sample, (B,) or (B, 1), and 0/1 labels."""
    return F.binary_cross_entropy_with_logits(output, _targets_like(output, labels))


def mse(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Regression: predictions and targets of the same number of values per sample."""
    return F.mse_loss(output, _targets_like(output, labels))


def l1(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(output, _targets_like(output, labels))


BUILTIN: dict[str, Loss] = {"cross_entropy": cross_entropy, "nll": nll, "bce_with_logits": bce_with_logits,
                            "mse": mse, "l1": l1}


def resolve(name: str) -> Loss:
    """A built-in loss by name, or ``"package.module:function"`` from the local machine.

    Raises:
        ValueError: unknown name, or an import path that does not give a callable.
    """
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown loss {name!r}: use one of {sorted(BUILTIN)} or 'package.module:function'")
    fn = load_object(name, what="loss")
    if not callable(fn):
        raise ValueError(f"loss {name!r} is not callable")
    return fn  # type: ignore[no-any-return]
