"""Defences at the cut, owned by the data owner: NoPeek, noise, and a learned bottleneck.

Each is a hook or a layer, never a branch in a loop:

- ``NoPeek`` is a local loss (``Stage(local_loss=...)``): the distance correlation between a
  batch's raw input and its cut activations, weighted by lambda, added to the owner's own
  update. The activations it sends are unchanged; only how the bottom learns differs. It
  carries the collapse guard: a bottom pushed so hard that its activations stop varying
  between samples has learned nothing the top can use, and training stops with
  ``ActivationCollapse`` rather than going on silently.
- ``CutNoise`` is a layer appended to the owner's segment: Gaussian noise whose sigma is a
  multiple of the batch's activation scale, on every transmission (training and evaluation).
- ``Bottleneck`` is a learned linear layer appended to the owner's segment (D -> width); its
  partner ``narrow_input`` gives the first server stage's first linear layer ``width`` inputs
  instead of D. Both are built from the job, so every party derives the same ones.

What each defends against, measured by ``splitmq audit``, is in docs/privacy.md.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

#: Activation variance (across samples) below this share of the largest seen is a collapse...
COLLAPSE_RATIO = 1e-3
#: ...or below this absolute floor (a bottom whose ReLUs all died).
COLLAPSE_FLOOR = 1e-10
#: ...for this many training batches in a row (one odd batch is not a collapse).
COLLAPSE_PATIENCE = 20
_EPS = 1e-12


class ActivationCollapse(RuntimeError):
    """The cut activations stopped varying between samples: the bottom has stopped learning."""


def _distances(v: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances of the rows of ``v`` (B, F) -> (B, B), zero diagonal.

    Computed from squared distances clamped away from 0, so the gradient is finite even for
    identical rows (``torch.cdist``'s is not).
    """
    sq = (v.unsqueeze(1) - v.unsqueeze(0)).pow(2).sum(-1)           # (B, B)
    off = 1.0 - torch.eye(len(v), dtype=v.dtype, device=v.device)
    return torch.sqrt(sq.clamp_min(_EPS)) * off


def _centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al. 2007) between two batches, in [0, 1].

    0 means the rows of ``z`` carry no information about the rows of ``x`` (in the limit);
    1 means one is a similarity transform of the other. Differentiable in both.

    Args:
        x, z: (B, ...) batches of the same length B; each sample is flattened.

    Returns:
        a 0-d tensor (0 for a batch of fewer than 2 samples or a constant side).
    """
    if len(x) != len(z):
        raise ValueError(f"batches differ in length: {len(x)} and {len(z)}")
    if len(x) < 2:
        return z.sum() * 0.0
    a = _centred(_distances(x.reshape(len(x), -1).to(z.dtype)))
    b = _centred(_distances(z.reshape(len(z), -1)))
    dcov2_xz = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    return torch.sqrt((dcov2_xz / torch.sqrt(dvar2 + _EPS)).clamp_min(0.0) + _EPS)


def spread(z: torch.Tensor) -> float:
    """How much a batch's activations vary between samples: the mean per-feature variance."""
    flat = z.detach().reshape(len(z), -1)
    return float(flat.var(0, unbiased=False).mean()) if len(z) > 1 else math.nan


class CollapseGuard:
    """Raises ``ActivationCollapse`` once activations have stopped varying for ``patience`` batches."""

    def __init__(self, *, ratio: float = COLLAPSE_RATIO, floor: float = COLLAPSE_FLOOR,
                 patience: int = COLLAPSE_PATIENCE) -> None:
        if not 0 < ratio < 1 or floor < 0 or patience < 1:
            raise ValueError(f"need 0 < ratio < 1, floor >= 0, patience >= 1 (got {ratio}, {floor}, {patience})")
        self.ratio, self.floor, self.patience = ratio, floor, patience
        self.peak = 0.0
        self.low = 0

    def check(self, z: torch.Tensor) -> None:
        """Record one training batch's activations.

        Raises:
            ActivationCollapse: saying how far the spread fell and what to change.
        """
        now = spread(z)
        if math.isnan(now):  # a one-sample batch says nothing about spread
            return
        self.peak = max(self.peak, now)
        self.low = self.low + 1 if now < max(self.ratio * self.peak, self.floor) else 0
        if self.low >= self.patience:
            raise ActivationCollapse(
                f"the cut activations collapsed: their variance between samples fell to {now:.3g} "
                f"(peak {self.peak:.3g}) for {self.low} batches in a row, so the top can no longer tell "
                "samples apart. Lower nopeek_lambda or raise nopeek_warmup_epochs")


class NoPeek:
    """The NoPeek local loss: ``lambda(step) * dCor(raw input, cut activations)``.

    ``lambda`` ramps linearly from 0 over the first ``warmup_steps`` updates (0: full from the
    start); ``progress`` gives the number of updates the bottom has applied (its stage's
    version, which a checkpoint restores). Every call reports the batch's dCor to ``report``
    and feeds the activations to the collapse guard.
    """

    def __init__(self, *, weight: float, warmup_steps: int = 0, progress: Callable[[], int] = lambda: 0,
                 report: Callable[[float], None] | None = None, guard: CollapseGuard | None = None) -> None:
        if not math.isfinite(weight) or weight < 0 or warmup_steps < 0:
            raise ValueError(f"need weight >= 0 and warmup_steps >= 0 (got {weight}, {warmup_steps})")
        self.weight, self.warmup_steps = weight, warmup_steps
        self.progress, self.report = progress, report
        self.guard = guard if guard is not None else CollapseGuard()
        self.last: float = math.nan

    def weight_at(self, step: int) -> float:
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.weight
        return self.weight * step / self.warmup_steps

    def __call__(self, raw: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        """The loss term for one batch (raises ``ActivationCollapse``, see ``CollapseGuard``)."""
        self.guard.check(cut)
        dcor = distance_correlation(raw.detach(), cut)
        self.last = float(dcor.detach())
        if self.report is not None:
            self.report(self.last)
        return self.weight_at(self.progress()) * dcor


class CutNoise(nn.Module):
    """Adds N(0, (scale * std of the batch's activations)^2) to every activation sent.

    The std is measured on the batch itself (detached), so sigma follows the activations'
    scale as training changes it. Parameter-free: it does not change the bottom's weights.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"noise scale must be >= 0, got {scale}")
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale == 0 or z.numel() < 2:
            return z
        sigma = self.scale * z.detach().std()
        return z + sigma * torch.randn_like(z)

    def attach(self, segment: nn.Module) -> nn.Module:
        """Apply this noise to ``segment``'s output, as a forward hook: its state_dict (and so
        bottom averaging between owners with and without noise) is unchanged."""
        segment.register_forward_hook(lambda _module, _inputs, output: self(output))
        return segment


def _seeded_linear(fan_in: int, fan_out: int, seed: int) -> nn.Linear:
    """``nn.Linear`` with torch's default initialisation drawn from its own seeded generator
    (thread-safe, and the same on every party that builds it)."""
    layer = nn.Linear(fan_in, fan_out)
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=g)
        layer.bias.uniform_(-bound, bound, generator=g)
    return layer


class Bottleneck(nn.Sequential):
    """The owner's side of a narrow cut: a learned ``D -> width`` linear layer after its segment."""

    def __init__(self, segment: nn.Module, features: int, width: int, *, seed: int) -> None:
        super().__init__(segment, _seeded_linear(features, width, seed * 1000 + 901))


def narrow_input(segment: nn.Module, width: int, *, seed: int) -> nn.Module:
    """The first server stage's side of a narrow cut: its first ``nn.Linear`` (D -> H) becomes
    a fresh ``width -> H`` layer, the same on every party that builds it; the rest is unchanged.

    (Replacing rather than prepending a ``width -> D`` layer keeps the model as shallow as
    before: an extra linear layer slowed plain SGD by several points of accuracy.)

    Raises:
        ValueError: the segment does not start with ``nn.Linear``.
    """
    name, old = _first_linear(segment)
    new = _seeded_linear(width, old.out_features, seed * 1000 + 902)
    if old.bias is None:
        new.bias = None
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(segment.get_submodule(parent_name), child, new)
    return segment


def cut_features(out: torch.Tensor) -> int:
    """The width D of a flat cut from a probe output (B, D).

    Raises:
        ValueError: the cut is not flat (a bottleneck needs (B, D) activations).
    """
    if out.dim() != 2:
        raise ValueError(f"bottleneck needs a flat cut (batch, features); this one is {tuple(out.shape[1:])}: "
                         "cut the model after a flatten, or set bottleneck = 0")
    return int(out.shape[1])


def _first_linear(segment: nn.Module) -> tuple[str, nn.Linear]:
    """The segment's first layer with parameters, which must be ``nn.Linear`` (parameter-free
    layers such as Dropout or Flatten may come before it)."""
    for name, module in segment.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, nn.LazyLinear):
            return name, module
        if next(module.parameters(recurse=False), None) is not None:
            break
    raise ValueError(f"bottleneck needs the first server stage to start with nn.Linear (it starts with "
                     f"{_first_leaf(segment)}): cut where the next layer is linear, or set bottleneck = 0")


def _first_leaf(segment: nn.Module) -> str:
    leaves = [m for m in segment.modules() if not list(m.children())]
    return type(leaves[0]).__name__ if leaves else type(segment).__name__
