"""Model segments, defined once by name; every party builds its own from the same spec.

A model is a list of layers; ``cuts`` are indices into it. Segment ``i`` is
``layers[cuts[i-1]:cuts[i]]``. Both sides compute the cut shape from the spec and compare it
at join time, so a mismatch fails at start instead of mid-run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A named model: input shape per sample, how to build its layers, and its default cut."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    default_cuts: tuple[int, ...]
    build_layers: Callable[[], list[nn.Module]]


def _mlp_layers() -> list[nn.Module]:
    # The seed tutorial's network: 784 -> 128 -> 640 | 640 -> 10, log-softmax + NLL loss.
    return [
        nn.Linear(784, 128), nn.ReLU(),
        nn.Linear(128, 640), nn.ReLU(),
        nn.Linear(640, 10), nn.LogSoftmax(dim=1),
    ]


def _cnn_layers() -> list[nn.Module]:
    # LeNet-style; the default cut is after the two conv blocks.
    return [
        nn.Unflatten(1, (1, 28, 28)),                 # (B, 784) -> (B, 1, 28, 28)
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # -> (B, 6, 14, 14)
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),             # -> (B, 16, 5, 5)
        nn.Flatten(),                                  # -> (B, 400)
        nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10), nn.LogSoftmax(dim=1),
    ]


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", (784,), 10, (4,), _mlp_layers),
    "cnn": ModelSpec("cnn", (784,), 10, (8,), _cnn_layers),
}


def get_spec(name: str) -> ModelSpec:
    """Look a model up by name.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def resolve_cuts(spec: ModelSpec, cuts: tuple[int, ...]) -> tuple[int, ...]:
    """The cuts to use (the model's default for an empty tuple), checked to be increasing and inside."""
    cuts = cuts or spec.default_cuts
    n = len(spec.build_layers())
    if list(cuts) != sorted(set(cuts)) or cuts[0] <= 0 or cuts[-1] >= n:
        raise ValueError(f"cuts {cuts} must be strictly increasing within 1..{n - 1} for {spec.name}")
    return cuts


def build_segments(name: str, cuts: tuple[int, ...] = (), seed: int = 0) -> list[nn.Sequential]:
    """Build the whole model with ``seed`` and split it at ``cuts``.

    Every party calls this with the same seed and takes its own segment(s), so the split
    model starts from exactly the weights the unsplit one would.
    """
    spec = get_spec(name)
    cuts = resolve_cuts(spec, cuts)
    torch.manual_seed(seed)
    layers = spec.build_layers()
    bounds = (0, *cuts, len(layers))
    return [nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:])]


def build_full(name: str, seed: int = 0) -> nn.Sequential:
    """The unsplit model with the same initial weights as the segments (the local baseline)."""
    return nn.Sequential(*[layer for seg in build_segments(name, (), seed) for layer in seg])


def cut_shapes(name: str, cuts: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Per-sample shape of the tensor crossing each cut, computed by a dry run."""
    segments = build_segments(name, cuts)
    x = torch.zeros(2, *get_spec(name).input_shape)
    shapes = []
    with torch.no_grad():
        for seg in segments[:-1]:
            x = seg(x)
            shapes.append(tuple(x.shape[1:]))
    return shapes


# ---- vertical partitioning: parties hold different image columns of the same samples ----

def column_groups(parts: int, side: int = 28) -> list[torch.Tensor]:
    """Flat pixel indices of each party's contiguous block of image columns."""
    if not 1 <= parts <= side:
        raise ValueError(f"parts must be in 1..{side}, got {parts}")
    cols = torch.arange(side).tensor_split(parts)
    grid = torch.arange(side * side).view(side, side)               # (row, col) -> flat index
    return [grid[:, c].reshape(-1) for c in cols]                    # (side * len(c),)


def vertical_segments(parts: int, seed: int = 0) -> tuple[list[nn.Sequential], nn.Sequential]:
    """The MLP split vertically: one bottom per party over its columns, joined at 640 by concatenation.

    Party ``i``'s bottom maps its ``28 * cols_i`` pixels through 128/parts hidden units to
    640/parts features; the top is the seed MLP's head (640 -> 10, log-softmax).
    """
    torch.manual_seed(seed)
    groups = column_groups(parts)
    hidden, cut = 128 // parts, 640 // parts
    bottoms = [nn.Sequential(nn.Linear(len(g), hidden), nn.ReLU(), nn.Linear(hidden, cut), nn.ReLU())
               for g in groups]
    top = nn.Sequential(nn.Linear(cut * parts, 10), nn.LogSoftmax(dim=1))
    return bottoms, top


class VerticalModel(nn.Module):
    """The vertical split in one process (the local baseline): same weights, same join."""

    def __init__(self, parts: int, seed: int = 0) -> None:
        super().__init__()
        bottoms, top = vertical_segments(parts, seed)
        self.bottoms = nn.ModuleList(bottoms)
        self.top = top
        self.groups = column_groups(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = torch.cat([b(x[:, g]) for b, g in zip(self.bottoms, self.groups)], dim=1)  # (B, 640)
        return self.top(cut)
