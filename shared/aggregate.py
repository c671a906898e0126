"""Averaging of segment weights across data owners (SplitFed). Pure functions on tensors."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of state dicts with the same keys and shapes (FedAvg).

    Raises:
        ValueError: no states, mismatched keys or shapes, or non-positive total weight.
    """
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state, and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("total weight must be positive")
    keys = set(states[0])
    out: dict[str, torch.Tensor] = {}
    for name in sorted(keys):
        if any(set(s) != keys or s[name].shape != states[0][name].shape for s in states):
            raise ValueError(f"states disagree on {name!r}")
        weighted = torch.stack([s[name].double() * (w / total) for s, w in zip(states, weights)])
        out[name] = weighted.sum(0).to(states[0][name].dtype)
    return out
