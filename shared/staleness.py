"""Corrections for gradients applied to weights newer than the ones that produced them.

With K batches in flight a bottom segment applies each gradient ``g`` (computed at the
stashed weights ``w_old``) to its current weights ``w_now``, up to K-1 updates later. These
pure functions adjust ``g``; they take and return plain tensors and know nothing of queues.

- ``none``: apply ``g`` as is (plain weight stashing, as in PipeDream).
- ``dc``: delay compensation (Zheng et al., DC-ASGD, 2017): ``g + lam * g*g*(w_now - w_old)``,
  a cheap diagonal approximation of the Hessian term of a first-order Taylor expansion.
- ``lr``: staleness-aware step: ``g / (1 + staleness)`` (Zhang et al., 2016).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class StalenessCorrection(ABC):
    """One decision: what gradient to apply, given how stale it is."""

    #: Whether ``correct`` reads ``w_old``: if not, a stage copies only the weights its backward needs.
    reads_old_weights = False

    @abstractmethod
    def correct(self, grad: torch.Tensor, w_now: torch.Tensor, w_old: torch.Tensor, staleness: int) -> torch.Tensor:
        """Return the gradient to hand the optimizer for one parameter tensor (``grad`` is the
        caller's own fresh tensor: a correction may write into it)."""


class NoCorrection(StalenessCorrection):
    def correct(self, grad: torch.Tensor, w_now: torch.Tensor, w_old: torch.Tensor, staleness: int) -> torch.Tensor:
        return grad


class DelayCompensation(StalenessCorrection):
    reads_old_weights = True

    def __init__(self, *, lam: float) -> None:
        if lam < 0:
            raise ValueError(f"dc lambda must be >= 0, got {lam}")
        self.lam = lam

    def correct(self, grad: torch.Tensor, w_now: torch.Tensor, w_old: torch.Tensor, staleness: int) -> torch.Tensor:
        if staleness == 0:
            return grad
        drift = torch.sub(w_now, w_old).mul_(grad)  # three passes, one allocation: the loop's hot path
        return grad.addcmul_(drift, grad, value=self.lam)


class StalenessScaledStep(StalenessCorrection):
    def correct(self, grad: torch.Tensor, w_now: torch.Tensor, w_old: torch.Tensor, staleness: int) -> torch.Tensor:
        return grad / (1 + staleness)


def make(mode: str, *, dc_lambda: float = 1.0) -> StalenessCorrection:
    """Build a correction by its config name (``none``, ``dc``, ``lr``).

    Raises:
        ValueError: unknown mode.
    """
    if mode == "none":
        return NoCorrection()
    if mode == "dc":
        return DelayCompensation(lam=dc_lambda)
    if mode == "lr":
        return StalenessScaledStep()
    raise ValueError(f"unknown staleness correction {mode!r}")
