"""Model segments: built-in networks by name, or the user's own by import path.

A job's model is a chain of segments: ``bottom`` (the data owner's), then any ``middle``
hops, then ``top`` (the last, with the loss; a U-shaped run keeps it at the owner as its
head). A model factory (``"package.module:function"``) may

- return one ``nn.Sequential`` with named children: it is cut *after* the children named
  in ``cuts`` (``cuts = ["features"]``), every party building the whole model from the same
  seed and keeping its own segment, so the split starts from the unsplit model's weights;
- return a list of modules, one per segment, already cut;
- take a ``part`` argument (``"bottom"``, ``"middle"``, ``"top"``; a vertical job also
  passes ``party``, its index, and ``parties``) and build only that segment, so a party
  never needs another party's code. Each part is then seeded on its own.

The local baseline builds the segments the same way and chains them.
"""
from __future__ import annotations

import copy
import inspect
import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import nn

from splitmq.shared.loader import load_object

BOTTOM, TOP = "bottom", "top"


def mlp() -> nn.Sequential:
    """The seed tutorial's network: 784 -> 128 -> 640 | 640 -> 10, log-softmax (NLL loss)."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(784, 128)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(128, 640)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(640, 10)), ("log_softmax", nn.LogSoftmax(dim=1)),
    ]))


def cnn() -> nn.Sequential:
    """LeNet-style on 784-feature images; the default cut is after the two conv blocks."""
    return nn.Sequential(OrderedDict([
        ("unflatten", nn.Unflatten(1, (1, 28, 28))),                         # (B, 784) -> (B, 1, 28, 28)
        ("conv1", nn.Conv2d(1, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),  # (B, 6, 14, 14)
        ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),          # (B, 16, 5, 5)
        ("flatten", nn.Flatten()),                                                                   # (B, 400)
        ("fc1", nn.Linear(400, 120)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, 10)), ("log_softmax", nn.LogSoftmax(dim=1)),
    ]))


def column_groups(parts: int, side: int = 28) -> list[torch.Tensor]:
    """Flat pixel indices of each party's contiguous block of image columns (vertical MNIST)."""
    if not 1 <= parts <= side:
        raise ValueError(f"parts must be in 1..{side}, got {parts}")
    cols = torch.arange(side).tensor_split(parts)
    grid = torch.arange(side * side).view(side, side)               # (row, col) -> flat index
    return [grid[:, c].reshape(-1) for c in cols]                    # (side * len(c),)


def vertical_mlp(part: str, party: int = 0, parties: int = 2) -> nn.Module:
    """The MLP split vertically: party ``i``'s bottom maps its image columns through
    128/parts hidden units to 640/parts features; the top is the MLP's head over the joined 640."""
    if part == TOP:
        return nn.Sequential(OrderedDict([("fc3", nn.Linear(640 // parties * parties, 10)),
                                          ("log_softmax", nn.LogSoftmax(dim=1))]))
    width = len(column_groups(parties)[party])
    return nn.Sequential(OrderedDict([("fc1", nn.Linear(width, 128 // parties)), ("relu1", nn.ReLU()),
                                      ("fc2", nn.Linear(128 // parties, 640 // parties)), ("relu2", nn.ReLU())]))


#: Built-in models: name -> (factory, default cuts).
BUILTIN: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "mlp": (mlp, ("relu2",)),
    "cnn": (cnn, ("flatten",)),
    "vertical_mlp": (vertical_mlp, ()),
}


def part_names(count: int) -> list[str]:
    """Names of a chain of ``count`` segments: bottom, middle (or middle1, middle2, ...), top."""
    if count < 2:
        raise ValueError(f"a split model has at least 2 segments, got {count}")
    middles = ["middle"] if count == 3 else [f"middle{i}" for i in range(1, count - 1)]
    return [BOTTOM, *middles, TOP]


def factory(model: str) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """The model factory and its default cuts, for a built-in name or an import path.

    Raises:
        ValueError: unknown name, or a path that does not give a callable.
    """
    if model in BUILTIN:
        return BUILTIN[model]
    if ":" not in model:
        raise ValueError(f"unknown model {model!r}: use one of {sorted(BUILTIN)} or 'package.module:function'")
    fn = load_object(model, what="model")
    if isinstance(fn, nn.Module):  # an instance handed to the Python API: each build is a fresh copy
        instance = fn
        return (lambda: copy.deepcopy(instance)), ()
    if isinstance(fn, (list, tuple)) and all(isinstance(m, nn.Module) for m in fn):
        segments = list(fn)
        return (lambda: copy.deepcopy(segments)), ()
    if not callable(fn):
        raise ValueError(f"model {model!r} is not callable")
    return fn, ()


def takes_part(fn: Callable[..., Any]) -> bool:
    return "part" in inspect.signature(fn).parameters


def split_sequential(module: nn.Module, cuts: Sequence[str]) -> list[nn.Sequential]:
    """Cut a model whose children run in order after each child named in ``cuts``.

    Raises:
        ValueError: not a Sequential, an unknown name, or cuts out of order; lists the names.
    """
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"cuts need an nn.Sequential (got {type(module).__name__}); or return the segments "
                         "as a list, or take a 'part' argument")
    names = [name for name, _ in module.named_children()]
    try:
        positions = [names.index(c) + 1 for c in cuts]
    except ValueError:
        raise ValueError(f"cuts {list(cuts)} must name children of the model: {names}") from None
    if not positions or positions != sorted(set(positions)) or positions[-1] >= len(names):
        raise ValueError(f"cuts {list(cuts)} must be increasing and leave a last segment; children: {names}")
    children = list(module.named_children())
    bounds = (0, *positions, len(children))
    return [nn.Sequential(OrderedDict(children[a:b])) for a, b in zip(bounds, bounds[1:])]


#: Building seeds torch's global generator; parties running as threads of one process take turns.
_BUILDING = threading.Lock()


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Run ``build`` with torch's generator seeded, leaving the caller's generator state as it was."""
    with _BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _call(fn: Callable[..., Any], **offered: Any) -> Any:
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in offered.items() if k in params})


def build_segments(model: str, cuts: Sequence[str] = (), seed: int = 0, *, count: int = 2,
                   party: int = 0, parties: int = 1) -> list[nn.Module]:
    """Every segment of the chain (the local baseline, or a party taking its own from the list)."""
    fn, default_cuts = factory(model)
    names = part_names(count)
    if takes_part(fn):
        return [build_part(model, i, cuts, seed, count=count, party=party, parties=parties)
                for i in range(count)]
    built = _seeded(seed, fn)
    segments: list[nn.Module] = (list(built) if isinstance(built, (list, tuple))
                                 else list(split_sequential(built, cuts or default_cuts)))
    if len(segments) != count:
        raise ValueError(f"model {model!r} gives {len(segments)} segments; this job has {count} "
                         f"({', '.join(names)}): check cuts")
    return segments


def build_part(model: str, index: int, cuts: Sequence[str] = (), seed: int = 0, *, count: int = 2,
               party: int = 0, parties: int = 1) -> nn.Module:
    """Segment ``index`` of the chain, building only that part when the factory can."""
    fn, _ = factory(model)
    if takes_part(fn):
        module = _seeded(seed * 1000 + 100 * party + index,
                         lambda: _call(fn, part=part_names(count)[index], party=party, parties=parties))
        if not isinstance(module, nn.Module):
            raise ValueError(f"model {model!r} returned {type(module).__name__} for part "
                             f"{part_names(count)[index]!r}, not an nn.Module")
        return module
    return build_segments(model, cuts, seed, count=count, party=party, parties=parties)[index]


def parameter_shapes(module: nn.Module) -> list[list[Any]]:
    """``[name, [shape...]]`` of every parameter: what must agree between owners that share a bottom."""
    return [[name, list(p.shape)] for name, p in module.state_dict().items()]
