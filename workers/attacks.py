"""Real attacks on what crosses the cut, for ``splitmq audit``. Pure functions on tensors.

Reconstruction (what the party past the cut, or anyone reading the broker, learns of the
owner's inputs from the activations):

- ``decoder_attack``: a decoder trained on N leaked (input, activation) pairs, applied to
  the activations of samples it has not seen (weak: N = 500; strong: every other training
  sample). Averaging attacker: the same, on each sample's activations averaged over the
  epochs it was sent in (noise at the cut averages out; the sample does not).
- ``shadow_attack``: no leaked pairs. The attacker knows the bottom's architecture (its
  parameter shapes are in the owner's join message), holds the top and some data of the
  same kind: it trains a shadow bottom against the frozen top, pulled towards the
  statistics of the traffic it saw, then a decoder on its own (input, shadow activation)
  pairs, and applies that decoder to the real traffic.

Label inference (what the owner, or the broker, learns of labels kept at the top from the
returned gradients; binary tasks, Li et al. 2022), each scored as a leak AUC
(``max(AUC, 1 - AUC)``: 0.5 is no information, either way round):

- ``norm_scores``: the gradient's norm (relative to its batch's median);
- ``cosine_scores``: cosine to the gradient of one known positive sample of the batch;
- ``direction_scores``: no known label: the projection on the batch's principal direction,
  oriented consistently from batch to batch.

Every attack is scored by the same SSIM (``shared.ssim``) or AUC (``shared.scores``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from splitmq.shared.scores import roc_auc
from splitmq.shared.ssim import ssim

#: Decoder size and training: large enough that more leaked pairs keep helping.
DECODER_HIDDEN = 512
DECODER_STEPS = 1000
DECODER_BATCH = 128
DECODER_LR = 2e-3


@dataclass(frozen=True)
class Images:
    """How to read a flat input as a grey image for SSIM."""

    shape: tuple[int, int] = (28, 28)
    data_range: float = 2.0        # the built-in image sets are scaled to [-1, 1]
    low: float = -1.0


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale activations per feature by the leaked set's statistics (what an attacker can do)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit_decoder(z: torch.Tensor, x: torch.Tensor, *, images: Images, seed: int = 0,
                steps: int = DECODER_STEPS) -> nn.Module:
    """An MLP decoder from flattened activations to flattened inputs, trained on pairs (z, x)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = nn.Sequential(nn.Linear(z.shape[1], DECODER_HIDDEN), nn.ReLU(),
                                nn.Linear(DECODER_HIDDEN, x.shape[1]), nn.Tanh())
    opt = torch.optim.Adam(decoder.parameters(), lr=DECODER_LR, weight_decay=1e-5)
    half, mid = images.data_range / 2, images.low + images.data_range / 2
    target = (x - mid) / half                                             # into tanh's (-1, 1)
    for _ in range(steps):
        rows = torch.randint(len(z), (min(DECODER_BATCH, len(z)),), generator=g)
        loss = ((decoder(z[rows]) - target[rows]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return nn.Sequential(decoder, _Affine(half, mid))


class _Affine(nn.Module):
    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.scale + self.shift


def mean_ssim(x: torch.Tensor, x_hat: torch.Tensor, images: Images) -> float:
    """Mean SSIM between real and reconstructed flat images."""
    return float(ssim(x.reshape(-1, *images.shape), x_hat.reshape(-1, *images.shape),
                      data_range=images.data_range).mean())


def decoder_attack(z_leaked: torch.Tensor, x_leaked: torch.Tensor, z_target: torch.Tensor, x_target: torch.Tensor,
                   *, images: Images, seed: int = 0, steps: int = DECODER_STEPS) -> float:
    """Train on leaked pairs, reconstruct the targets; mean SSIM of the reconstructions."""
    zl, zt = _standardise(z_leaked.reshape(len(z_leaked), -1).float(), z_target.reshape(len(z_target), -1).float())
    decoder = fit_decoder(zl, x_leaked.reshape(len(x_leaked), -1).float(), images=images, seed=seed, steps=steps)
    with torch.no_grad():
        return mean_ssim(x_target, decoder(zt), images)


def shadow_attack(bottom: nn.Module, top: nn.Module, loss_fn: nn.Module | object, aux_x: torch.Tensor,
                  aux_y: torch.Tensor, traffic: torch.Tensor, z_target: torch.Tensor, x_target: torch.Tensor, *,
                  images: Images, seed: int = 0, steps: int = DECODER_STEPS) -> float:
    """The shadow attacker (no leaked pairs); ``bottom`` is a fresh module of the bottom's
    architecture, trained here. Returns the mean SSIM of its reconstructions of the targets."""
    g = torch.Generator().manual_seed(seed + 1)
    for p in top.parameters():
        p.requires_grad_(False)
    seen = traffic.reshape(len(traffic), -1)
    mean, std = seen.mean(0), seen.std(0)
    opt = torch.optim.Adam(bottom.parameters(), lr=1e-3)
    for _ in range(steps):
        rows = torch.randint(len(aux_x), (min(DECODER_BATCH, len(aux_x)),), generator=g)
        z = bottom(aux_x[rows])
        flat = z.reshape(len(z), -1)
        task = loss_fn(top(z), aux_y[rows])  # type: ignore[operator]
        moments = ((flat.mean(0) - mean) ** 2).mean() + ((flat.std(0) - std) ** 2).mean()
        loss = task + moments / std.pow(2).mean().clamp_min(1e-8)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        own = bottom(aux_x)
    return decoder_attack(own, aux_x, z_target, x_target, images=images, seed=seed, steps=steps)


# ---- labels ---------------------------------------------------------------------------------

def leak_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """``max(AUC, 1 - AUC)`` of a score for the positive class (0.5: the score tells nothing)."""
    auc = roc_auc(scores.double(), positive.bool())
    return max(auc, 1.0 - auc)


def norm_scores(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each sample's gradient norm over its batch's median norm (norms shrink as training goes)."""
    out = []
    for g in grads:
        n = g.reshape(len(g), -1).double().norm(dim=1)
        out.append(n / n.median().clamp_min(1e-30))
    return torch.cat(out)


def cosine_scores(grads: Sequence[torch.Tensor], positive: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of each gradient to that of one known positive of its batch (the first one).

    Returns the scores and which were positive; the known sample and batches without a
    positive are left out.
    """
    scores, labels = [], []
    for g, pos in zip(grads, positive):
        flat = g.reshape(len(g), -1).double()
        known = torch.nonzero(pos).flatten()
        if len(known) == 0:
            continue
        ref = flat[known[0]]
        rest = torch.ones(len(flat), dtype=torch.bool)
        rest[known[0]] = False
        cos = flat[rest] @ ref / (flat[rest].norm(dim=1) * ref.norm()).clamp_min(1e-30)
        scores.append(cos)
        labels.append(pos[rest])
    return torch.cat(scores), torch.cat(labels)


def direction_scores(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """No known label: each gradient's projection on its batch's first principal direction,
    the direction's sign kept consistent with the previous batch's."""
    out, previous = [], None
    for g in grads:
        flat = g.reshape(len(g), -1).double()
        _, _, vh = torch.linalg.svd(flat, full_matrices=False)
        v = vh[0]
        if previous is not None and float(v @ previous) < 0:
            v = -v
        previous = v
        out.append(flat @ v / flat.norm(dim=1).clamp_min(1e-30))
    return torch.cat(out)
