"""Label protection at the label holder: what the gradient it returns may reveal of the labels.

When the labels stay with the party that computes the loss (``label_source = top``, or a
U-shaped owner's own head), the gradient it sends back still leaks them: for a binary task
the gradients of the two classes point in opposite directions along the top's weights, and
the rarer class has the larger norms (Li et al., "Label Leakage and Protection in Two-party
Split Learning", ICLR 2022). A ``GradientProtection`` is the hook the top calls on every
training gradient before it leaves (``protect(grad, labels) -> grad``).

``MarvellNoise`` is that paper's Marvell. Per batch it models each class's gradients as a
Gaussian and chooses class-dependent zero-mean noise covariances ``a_c * e e^T + s_c * I``
(``e``: the unit vector of the gap between the class means; ``c``: the class) that minimise the
symmetrised KL divergence between the two classes' protected gradient distributions (which
bounds the AUC of *any* label attack: AUC <= 1/2 + sqrt(sumKL)/2 - sumKL/8, the paper's
Theorem 1), under a noise power budget: expected noise power per sample = ``scale *
||gap||^2``. The optimisation (two free scalars) is solved per batch on a refined grid
(deterministic; its cost is in docs/privacy.md).

Where this differs from the paper, each measured with ``splitmq audit`` (docs/privacy.md):

- Each class's spread is estimated separately along the gap and across it (the paper takes
  it as the same in every direction). A one-logit top returns gradients that all lie on one
  line; the paper's model would see spread across that line and spend power on noise in
  every direction, which turns the no-label direction attack's read of each sample's side of
  the line into a finer score (direction AUC 0.558 against 0.549 at the same power).
- The noise is drawn conditioned on summing to zero over the batch. Each sample keeps its
  noise (variance down by about 1/B), so what an attacker sees per sample is unchanged, but
  the owner's update, which sums over the batch, no longer gets the noise's common part (its
  layers' biases get none). Without it, the audit's binary task at scale 16 with a 16-wide
  bottleneck (then without its layer norm) overflowed; with it, it trained. The sum reveals
  only what the unprotected batch gradient reveals (roughly how many positives it holds).
- The arithmetic is in float64, rounded once to the gradient's dtype.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

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


#: Points per axis of each round of the covariance search, and its rounds (each zooms in on the best).
GRID, ROUNDS = 33, 3


@dataclass(frozen=True)
class Covariances:
    """Marvell's noise for one batch: class c gets ``a_c`` along ``direction``, ``s_c`` in every direction."""

    direction: torch.Tensor     # (D,) float64, unit vector of the class-mean gap (positive minus negative)
    a0: float
    s0: float
    a1: float
    s1: float
    sum_kl: float               # the bound's value at this optimum (0: the classes cannot be told apart)


@dataclass(frozen=True)
class Spread:
    """A batch's two classes as Marvell models them: squared gap between the means, each class's
    variance along the gap and per direction across it (0: negatives, 1: positives)."""

    gap2: float
    along0: float
    along1: float
    across0: float
    across1: float
    p: float                    # share of positives


def sum_kl(a0: torch.Tensor, s0: torch.Tensor, a1: torch.Tensor, s1: torch.Tensor, spread: Spread,
           d: int) -> torch.Tensor:
    """KL(P1||P0) + KL(P0||P1) of the protected gradients, each class modelled as a Gaussian with its
    own variance along the gap and in each direction across it, means ``sqrt(spread.gap2)`` apart."""
    along0, along1 = a0 + s0 + spread.along0, a1 + s1 + spread.along1
    across0, across1 = s0 + spread.across0, s1 + spread.across1
    return ((d - 1) * (across0 / across1 + across1 / across0)
            + (along0 + spread.gap2) / along1 + (along1 + spread.gap2) / along0) / 2 - d


def optimal_covariances(direction: torch.Tensor, spread: Spread, power: float) -> Covariances:
    """The covariances minimising ``sum_kl`` with expected noise power per sample ``power``
    (``(1 - p) * (a0 + d * s0) + p * (a1 + d * s1)``, p: the share of positives).

    As in the paper's solver, only the class with the smaller spread across the gap gets noise in
    every direction (it brings that class's spread up to the other's); the rest of the budget is
    split between the two classes along the gap. Searched over (share q of the power spent in
    every direction, share r of the rest given to the negatives) on a grid refined ``ROUNDS`` times.
    """
    d, p = direction.numel(), spread.p
    floor = 1e-12 * (spread.gap2 + spread.along0 + spread.along1) + 1e-300   # a class of one sample has no spread
    spread = Spread(spread.gap2, max(spread.along0, floor), max(spread.along1, floor), max(spread.across0, floor),
                    max(spread.across1, floor), p)
    q_range, r_range = (0.0, 1.0), (0.0, 1.0)
    best = (0.0, 0.0, 0.0, 0.0, math.inf)
    for _ in range(ROUNDS):
        q = torch.linspace(*q_range, GRID, dtype=torch.float64).unsqueeze(1)      # (G, 1)
        r = torch.linspace(*r_range, GRID, dtype=torch.float64).unsqueeze(0)      # (1, G)
        everywhere, rest = q * power, (1 - q) * power
        a0, a1 = r * rest / (1 - p), (1 - r) * rest / p                           # (G, G)
        zero = torch.zeros_like(everywhere)
        s0, s1 = ((everywhere / ((1 - p) * d), zero) if spread.across0 <= spread.across1
                  else (zero, everywhere / (p * d)))
        kl = sum_kl(a0, s0, a1, s1, spread, d)
        i, j = divmod(int(torch.argmin(kl)), GRID)
        best = (float(a0[i, j]), float(s0[i, 0]), float(a1[i, j]), float(s1[i, 0]), float(kl[i, j]))
        q_range = _around(float(q[i, 0]), q_range)
        r_range = _around(float(r[0, j]), r_range)
    return Covariances(direction, *best)


def _around(x: float, bounds: tuple[float, float]) -> tuple[float, float]:
    step = (bounds[1] - bounds[0]) / (GRID - 1)
    return max(0.0, x - step), min(1.0, x + step)


def batch_covariances(flat: torch.Tensor, positive: torch.Tensor, scale: float) -> Covariances | None:
    """Marvell's covariances for a batch (float64 rows, both classes present); None if the two
    class means coincide or are not finite."""
    pos, neg = flat[positive], flat[~positive]
    mean1, mean0 = pos.mean(0), neg.mean(0)
    gap = mean1 - mean0
    gap2 = float(gap @ gap)
    if not 0 < gap2 < math.inf:                          # nothing to hide, or a diverged batch
        return None
    e, d = gap / math.sqrt(gap2), flat.shape[1]
    dev0, dev1 = neg - mean0, pos - mean1
    along0, along1 = float(((dev0 @ e) ** 2).mean()), float(((dev1 @ e) ** 2).mean())
    across0 = (float((dev0 ** 2).sum(1).mean()) - along0) / max(d - 1, 1)
    across1 = (float((dev1 ** 2).sum(1).mean()) - along1) / max(d - 1, 1)
    spread = Spread(gap2, along0, along1, max(across0, 0.0), max(across1, 0.0), len(pos) / len(flat))
    return optimal_covariances(e, spread, scale * gap2)


class MarvellNoise(GradientProtection):
    """Marvell's class-dependent noise, optimised per batch, power ``scale * ||gap||^2`` per sample.

    For binary labels (0/1, any shape with one label per sample). A batch holding one class
    only reuses the last batch's covariances (and goes out unprotected before any are known,
    which can happen only on the very first batches of a job).
    """

    def __init__(self, *, scale: float, seed: int = 0) -> None:
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"label protection scale must be > 0, got {scale}")
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)
        self.last: Covariances | None = None

    def protect(self, grad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(len(grad), -1).double()                         # (B, D)
        positive = labels.reshape(len(grad), -1)[:, 0] > 0.5                # (B,)
        if bool(positive.any()) and not bool(positive.all()):
            self.last = batch_covariances(flat, positive, self.scale) or self.last
        if self.last is None:
            return grad
        noise = zero_sum_noise(self.last, positive, self.generator)
        return (flat + noise).to(grad.dtype).reshape(grad.shape)


def zero_sum_noise(cov: Covariances, positive: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw of each sample's noise (B, D), float64, conditioned on summing to zero over the batch.

    Along the gap and across it the draws are independent Gaussians; conditioning a Gaussian
    vector with variances w_i on its sum being zero subtracts ``w_i / sum(w)`` of the sum from
    sample i (exact, and it keeps each sample's variance within a factor ``1 - w_i / sum(w)``).
    """
    e, which = cov.direction, positive.long()
    along = torch.tensor([cov.a0 + cov.s0, cov.a1 + cov.s1], dtype=torch.float64)[which]   # (B,) variance along e
    across = torch.tensor([cov.s0, cov.s1], dtype=torch.float64)[which]                    # (B,) each other direction
    z = torch.randn(len(positive), generator=generator, dtype=torch.float64) * along.sqrt()
    if float(along.sum()) > 0:
        z = z - along / along.sum() * z.sum()
    noise = z.unsqueeze(1) * e                                                   # (B, D)
    if float(across.sum()) > 0:
        xi = torch.randn(len(positive), e.numel(), generator=generator, dtype=torch.float64)
        xi = (xi - (xi @ e).unsqueeze(1) * e) * across.sqrt().unsqueeze(1)
        noise = noise + xi - (across / across.sum()).unsqueeze(1) * xi.sum(0)
    return noise
