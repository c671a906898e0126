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
- ``Bottleneck`` is a learned linear layer appended to the owner's segment (D -> width), then
  a layer norm without parameters; its partner ``narrow_input`` gives the first server
  stage's first linear layer ``width`` inputs instead of D. Both are built from the job, so
  every party derives the same ones.

What each defends against, measured by ``splitmq audit``, is in docs/privacy.md.
"""
from __future__ import annotations

import collections
import math
from typing import Callable

import torch
from torch import nn

#: On average over the last batches, the gradient asks for this many times more directions than
#: the activations vary in: the bottom no longer gives the top what it needs. Measured on the seed
#: MLP (median per epoch): 0.9-1.5 undefended, 1.6-2.4 at NoPeek lambda 0.5, 2.9-4.3 at 1
#: (accuracy 0.81), 4.5-5.9 at 1.5 (0.77), 5.8-6.7 at 2 (0.69), 7.2-7.4 at 5 (0.25).
COLLAPSE_MISMATCH = 6.0
#: ...or the activations' variance between samples stayed below this floor (every ReLU died)...
COLLAPSE_FLOOR = 1e-10
#: ...over this many training batches (one odd batch is not a collapse).
COLLAPSE_PATIENCE = 20
_EPS = 1e-12


class ActivationCollapse(RuntimeError):
    """The cut activations stopped varying between samples: the bottom has stopped learning."""


def _distances(v: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances of the rows of ``v`` (B, F) -> (B, B), zero diagonal.

    Computed from squared distances clamped away from 0, so the gradient is finite even for
    identical rows (``torch.cdist``'s is not); through the Gram matrix, since the (B, B, F)
    differences cost ~30x more per NoPeek step at B = 64, F = 784.
    """
    norms = v.pow(2).sum(1)                                          # (B,)
    sq = norms.unsqueeze(1) + norms.unsqueeze(0) - 2.0 * (v @ v.T)   # (B, B)
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


def dimension(m: torch.Tensor) -> float:
    """Effective number of directions a batch spans: the participation ratio of its singular
    values, (sum s^2)^2 / sum s^4 (1 for a line, k for k equal directions).

    The squared singular values are the eigenvalues of the smaller Gram matrix: a (B, B)
    symmetric eigenproblem costs a fraction of an SVD of the (B, F) batch on every NoPeek step.
    """
    flat = m.detach().reshape(len(m), -1).double()                      # (B, F)
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
    s2 = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    total = float(s2.sum())
    return total ** 2 / float(s2.pow(2).sum()) if total > 0 else 0.0


class CollapseGuard:
    """Raises ``ActivationCollapse`` once the activations have collapsed for ``patience`` batches.

    Collapsed means either that they no longer vary between samples, or that the gradient the
    top returns spans ``mismatch`` times more directions than they vary in: the top keeps
    asking for differences between samples that the bottom no longer makes. (Variance alone
    does not show a NoPeek collapse: dCor is scale-free, and the activations shrink onto a
    line rather than a point. A line is also what a healthy binary model sends, but its
    gradient then lies on a line too.)
    """

    def __init__(self, *, mismatch: float = COLLAPSE_MISMATCH, floor: float = COLLAPSE_FLOOR,
                 patience: int = COLLAPSE_PATIENCE) -> None:
        if mismatch <= 1 or floor < 0 or patience < 1:
            raise ValueError(f"need mismatch > 1, floor >= 0, patience >= 1 (got {mismatch}, {floor}, {patience})")
        self.mismatch, self.floor, self.patience = mismatch, floor, patience
        self.recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=patience)  # (spread, ratio)
        self.ratio = math.nan   # the last batch's gradient / activation dimensions

    def check(self, z: torch.Tensor, grad: torch.Tensor) -> None:
        """Record one training batch's activations and the top's gradient of them.

        Raises:
            ActivationCollapse: saying what was seen and what to change.
        """
        now = spread(z)
        if math.isnan(now):  # a one-sample batch says nothing
            return
        flat = z.reshape(len(z), -1)
        own = dimension(flat - flat.mean(0))
        self.ratio = dimension(grad) / max(own, 1e-12)
        self.recent.append((now, self.ratio))
        if len(self.recent) < self.patience:
            return
        dead = all(v < self.floor for v, _ in self.recent)
        mismatch = sum(r for _, r in self.recent) / len(self.recent)
        if dead or mismatch > self.mismatch:
            raise ActivationCollapse(
                f"the cut activations collapsed: over the last {self.patience} batches they varied between samples "
                f"in {own:.2f} effective directions (variance {now:.3g}) while the top's gradient asked for "
                f"{mismatch:.1f} times as many, so the top can no longer learn from them. "
                "Lower nopeek_lambda or raise nopeek_warmup_epochs")


class NoPeek:
    """The NoPeek local loss: ``lambda(step) * dCor(raw input, cut activations)``.

    ``lambda`` ramps linearly from 0 over the first ``warmup_steps`` updates (0: full from the
    start); ``progress`` gives the number of updates the bottom has applied (its stage's
    version, which a checkpoint restores). Every call reports the batch's dCor to ``report``.
    It also watches the gradient the top returns for the activations (a hook on them) and
    hands each batch to the collapse guard, one batch later.
    """

    def __init__(self, *, weight: float, warmup_steps: int = 0, progress: Callable[[], int] = lambda: 0,
                 report: Callable[[float], None] | None = None, guard: CollapseGuard | None = None) -> None:
        if not math.isfinite(weight) or weight < 0 or warmup_steps < 0:
            raise ValueError(f"need weight >= 0 and warmup_steps >= 0 (got {weight}, {warmup_steps})")
        self.weight, self.warmup_steps = weight, warmup_steps
        self.progress, self.report = progress, report
        self.guard = guard if guard is not None else CollapseGuard()
        self.last: float = math.nan
        self._seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (z, own grad, total grad)

    def weight_at(self, step: int) -> float:
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.weight
        return self.weight * step / self.warmup_steps

    def __call__(self, raw: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        """The loss term for one batch (raises ``ActivationCollapse``, see ``CollapseGuard``)."""
        for z, own, total in self._seen:
            self.guard.check(z, total - own)   # the top's gradient: the total less NoPeek's own part
        self._seen.clear()
        dcor = distance_correlation(raw.detach(), cut)
        self.last = float(dcor.detach())
        loss = self.weight_at(self.progress()) * dcor
        if self.report is not None:
            self.report(self.last)
        if cut.requires_grad:
            own = torch.autograd.grad(loss, cut, retain_graph=True, allow_unused=True)[0]
            own = torch.zeros_like(cut) if own is None else own
            z = cut.detach()
            cut.register_hook(  # type: ignore[no-untyped-call]
                lambda total: self._seen.append((z, own.detach(), total.detach())))
        return loss


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
    """The owner's side of a narrow cut: a learned ``D -> width`` linear layer after its segment,
    then a layer norm without parameters (each sample's ``width`` values scaled to mean 0, std 1).

    The norm is what lets the narrow cut train as fast as the wide one: without it, this layer
    and the top's narrowed first layer are two small linear maps in a row, which plain SGD is
    slow to grow (7 points of accuracy lost at 5 epochs on the seed MLP). With it the preset
    trains faster than the undefended job and leaks less to reconstruction (docs/privacy.md). It has no
    parameters or buffers: the segment's state is the linear layer's, as before.
    """

    def __init__(self, segment: nn.Module, features: int, width: int, *, seed: int) -> None:
        super().__init__(segment, _seeded_linear(features, width, seed * 1000 + 901),
                         nn.LayerNorm(width, elementwise_affine=False))


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
