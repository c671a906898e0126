"""A model of the test suite's own, loaded by import path (``tests.user_model:build``) in separate
processes: what a user's package looks like to splitmq."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def build() -> nn.Sequential:
    """A small MLP with a dropout-free, batch-norm-free body (deterministic), cut after ``body``."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(784, 96)), ("act1", nn.Tanh()),
        ("fc2", nn.Linear(96, 48)), ("body", nn.ReLU()),
        ("head", nn.Linear(48, 10)),
    ]))


def build_part(part: str) -> nn.Module:
    """The same shape of model, built one part at a time (a party needs only its own code)."""
    if part == "bottom":
        return nn.Sequential(OrderedDict([("fc1", nn.Linear(784, 96)), ("act1", nn.Tanh()),
                                          ("fc2", nn.Linear(96, 48)), ("body", nn.ReLU())]))
    return nn.Sequential(OrderedDict([("head", nn.Linear(48, 10))]))


def narrow_bottom(part: str) -> nn.Module:
    """A bottom that sends 32 features where the top expects 48: a join must refuse it."""
    if part == "bottom":
        return nn.Sequential(OrderedDict([("fc1", nn.Linear(784, 32)), ("body", nn.ReLU())]))
    return nn.Sequential(OrderedDict([("head", nn.Linear(48, 10))]))
