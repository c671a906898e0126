"""Label protection at the label holder: what the gradient it returns may reveal of the labels.

When the labels stay with the party that computes the loss (``label_source = top``, or a
U-shaped owner's own head), the gradient it sends back still leaks them: for a binary task
the gradients of the two classes point in opposite directions along the top's weights, and
the rarer class has the larger norms (Li et al., "Label Leakage and Protection in Two-party
Split Learning", ICLR 2022). A ``GradientProtection`` is the hook the top calls on every
training gradient before it leaves (``protect(grad, labels) -> grad``).

``MarvellNoise`` is a simpler variant of that paper's Marvell: Marvell adds class-dependent
Gaussian noise whose covariances are optimised, per batch, to minimise a bound on how well
any attacker can tell the classes apart, under a noise power budget ``s * ||g1 - g0||^2``
(the distance between the two class-mean gradients). When the two classes' gradient
covariances are taken as equal, that optimum puts the whole budget along the class-mean
gap: this is what ``MarvellNoise`` does, with one scalar noise draw per sample along the
unit vector of the gap. It needs no optimisation per batch and keeps the gradient's
expectation (the bottom learns as before, more slowly). Noise that spreads the same power
isotropically protects almost nothing: most of it misses the one direction that leaks.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


class GradientProtection(ABC):
    """What the label holder does to each training batch's input gradient before sending it."""

    @abstractmethod
    def protect(self, grad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The gradient to send for a batch with these labels (same shape as ``grad``)."""


class NoProtection(GradientProtection):
    """The gradient as computed."""

    def protect(self, grad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return grad


class MarvellNoise(GradientProtection):
    """Zero-mean Gaussian noise along the class-mean gradient gap, power ``scale * ||gap||^2``.

    For binary labels (0/1, any shape with one label per sample). A batch holding one class
    only reuses the last gap seen (and sends its gradient unprotected before any gap is known,
    which can happen only on the very first batches of a job).
    """

    def __init__(self, *, scale: float, seed: int = 0) -> None:
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"label protection scale must be > 0, got {scale}")
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)
        self.direction: torch.Tensor | None = None   # unit vector of the last gap, (D,)
        self.gap = 0.0                               # its length

    def protect(self, grad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(len(grad), -1)                              # (B, D)
        positive = labels.reshape(len(grad), -1)[:, 0] > 0.5            # (B,)
        if bool(positive.any()) and not bool(positive.all()):
            gap = flat[positive].double().mean(0) - flat[~positive].double().mean(0)
            norm = float(gap.norm())
            if norm > 0:
                self.direction, self.gap = (gap / norm).to(flat.dtype), norm
        if self.direction is None:
            return grad
        draws = torch.randn(len(flat), generator=self.generator, dtype=torch.float64)   # (B,)
        sigma = math.sqrt(self.scale) * self.gap
        noise = (draws * sigma).to(flat.dtype).unsqueeze(1) * self.direction.to(flat.device)  # (B, D)
        return (flat + noise).reshape(grad.shape)
