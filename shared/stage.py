"""The one stage abstraction: a model segment with its optimizer.

A stage turns a forward input into an output (keeping what backward needs under a key),
and turns the gradient of that output into an update and the gradient of its input. The
last stage also owns the loss. Bottom, middle and top segments, U-shaped heads and the
parties of a vertical split are all Stages; the processes around them only move messages.

With several batches in flight a stage applies each gradient against the weights that
produced its batch (weight stashing, as in PipeDream): ``forward`` keeps a copy of the
parameters, ``backward`` differentiates through that copy and hands the result, corrected
for staleness, to the optimizer of the live weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from splitmq.shared.staleness import NoCorrection, StalenessCorrection


@dataclass
class _Pending:
    inputs: torch.Tensor                       # leaf; requires grad when the stage returns input grads
    output: torch.Tensor                       # carries the autograd graph
    params: dict[str, torch.Tensor] | None     # stashed parameter copies (None: the live weights)
    version: int                               # optimizer updates applied before this forward


@dataclass(frozen=True)
class LossStep:
    """What the last stage reports for one training batch."""

    loss: float
    correct: int
    grad_input: torch.Tensor | None


class Stage:
    """A segment, its SGD optimizer, and the batches whose gradient it still awaits."""

    def __init__(self, segment: nn.Module, *, lr: float, momentum: float = 0.0,
                 correction: StalenessCorrection | None = None, stash_weights: bool = False,
                 input_grad: bool = True, schedule: Callable[[int], float] | None = None) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.segment = segment
        self.optimizer = torch.optim.SGD(segment.parameters(), lr=lr, momentum=momentum)
        self.correction = correction or NoCorrection()
        self.stash_weights = stash_weights
        self.input_grad = input_grad
        self.schedule = schedule
        self.version = 0
        self._pending: dict[Hashable, _Pending] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def forward(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """Training forward pass; the result is detached, the graph kept under ``key``."""
        inputs = x.detach().requires_grad_(self.input_grad)
        params = None
        if self.stash_weights:
            params = {n: p.detach().clone().requires_grad_() for n, p in self.segment.named_parameters()}
            output = functional_call(self.segment, params, (inputs,))
        else:
            output = self.segment(inputs)
        self._pending[key] = _Pending(inputs, output, params, self.version)
        return output.detach()

    def backward(self, key: Hashable, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """Backprop ``grad_output`` through batch ``key``'s forward and apply the update.

        Returns the gradient of the stage's input (None when ``input_grad`` is off) and the
        batch's staleness (updates applied since its forward).

        Raises:
            KeyError: no pending forward for ``key``.
        """
        pending = self._pending.pop(key)
        staleness = self.version - pending.version
        live = dict(self.segment.named_parameters())
        wrt = list(pending.params.values()) if pending.params is not None else list(live.values())
        if self.input_grad:
            wrt = [pending.inputs, *wrt]
        grads = torch.autograd.grad(pending.output, wrt, grad_output)
        grad_input = grads[0] if self.input_grad else None
        param_grads = grads[1:] if self.input_grad else grads
        for (name, p), g in zip(live.items(), param_grads):
            if pending.params is not None:
                g = self.correction.correct(g, p.detach(), pending.params[name].detach(), staleness)
            p.grad = g
        self._step()
        return grad_input, staleness

    def loss_step(self, x: torch.Tensor, labels: torch.Tensor) -> LossStep:
        """Last stage: forward, NLL loss, backward and update in one go (no stash needed)."""
        inputs = x.detach().requires_grad_(self.input_grad)
        output = self.segment(inputs)
        loss = F.nll_loss(output, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self._step()
        correct = int((output.detach().argmax(1) == labels).sum())
        return LossStep(float(loss.detach()), correct, inputs.grad if self.input_grad else None)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation forward pass: no graph, no stash."""
        with torch.no_grad():
            return self.segment(x)

    def output_shape(self, key: Hashable) -> tuple[int, ...]:
        """Shape of batch ``key``'s output: the shape its gradient must have."""
        return tuple(self._pending[key].output.shape)

    def discard(self, key: Hashable) -> None:
        """Forget a batch whose gradient will never come (e.g. a skipped vertical batch)."""
        self._pending.pop(key, None)

    def _step(self) -> None:
        if self.schedule is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule(self.version)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1

    def state(self) -> dict[str, Any]:
        """Weights, optimizer state and version, for a checkpoint (weights_only-loadable)."""
        return {"segment": self.segment.state_dict(), "optimizer": self.optimizer.state_dict(),
                "version": self.version}

    def load_state(self, state: dict[str, Any]) -> None:
        self.segment.load_state_dict(state["segment"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self._pending.clear()


def evaluate_correct(output: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL loss and number of correct predictions of a log-probability output."""
    return float(F.nll_loss(output, labels, reduction="sum")), int((output.argmax(1) == labels).sum())
