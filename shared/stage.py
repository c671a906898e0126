"""The one stage abstraction: a model segment with its optimizer (and, if last, its loss).

A stage turns a forward input into an output (keeping what backward needs under a key),
and turns the gradient of that output into an update and the gradient of its input. The
last stage also owns the loss. Bottom, middle and top segments, U-shaped heads and the
parties of a vertical split are all Stages; the roles around them only move messages.

With several batches in flight a stage applies each gradient against the weights that
produced its batch (weight stashing, as in PipeDream): ``forward`` keeps a copy of the
parameters, ``backward`` differentiates through that copy and hands the result, corrected
for staleness, to the optimizer of the live weights. Any optimizer works this way: the
stash changes which gradient is computed, not how it is applied. Batches forwarded between
two updates share one stash (with coalescing, a bundle's batches usually are), so a copy is
paid per weight version, not per batch.

Tensors cross the stage boundary on the CPU; a stage on a GPU moves each batch's input
there once and its output (or input gradient) back once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from torch import nn
from torch.func import functional_call

from splitmq.shared.losses import Loss
from splitmq.shared.optim import OptimizerSpec
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
    output: torch.Tensor               # detached, on the CPU
    grad_input: torch.Tensor | None    # on the CPU


class Stage:
    """A segment, its optimizer, and the batches whose gradient it still awaits."""

    def __init__(self, segment: nn.Module, *, optimizer: OptimizerSpec,
                 correction: StalenessCorrection | None = None, stash_weights: bool = False,
                 input_grad: bool = True, schedule: Callable[[int], float] | None = None,
                 loss: Loss | None = None, device: str | torch.device = "cpu",
                 local_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.device = torch.device(device)
        self.segment = segment.to(self.device)
        self.optimizer = optimizer.build(self.segment.parameters())
        self._base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.correction = correction or NoCorrection()
        self.stash_weights = stash_weights
        self.input_grad = input_grad
        self.schedule = schedule
        self.loss = loss
        #: A loss the stage adds on its own side, from its raw input and its output (NoPeek).
        self.local_loss = local_loss
        self.version = 0
        self._pending: dict[Hashable, _Pending] = {}
        self._params = dict(self.segment.named_parameters())  # walked once: the tree is fixed
        self._stash: tuple[int, dict[str, torch.Tensor]] | None = None  # (version, copies) last stashed

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True) if x.device != self.device else x

    def forward(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """Training forward pass; the result is detached (on the CPU), the graph kept under ``key``."""
        inputs = self._in(x).detach().requires_grad_(self.input_grad)
        params = None
        if self.stash_weights:
            params = self._stashed()
            output: torch.Tensor = functional_call(self.segment, params, (inputs,))
        else:
            output = self.segment(inputs)
        self._pending[key] = _Pending(inputs, output, params, self.version)
        return output.detach().cpu()

    def _stashed(self) -> dict[str, torch.Tensor]:
        """Copies of the weights at this version, made once and shared by its batches (read-only)."""
        if self._stash is None or self._stash[0] != self.version:
            self._stash = (self.version, {n: p.detach().clone().requires_grad_() for n, p in self._params.items()})
        return self._stash[1]

    def backward(self, key: Hashable, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """Backprop ``grad_output`` through batch ``key``'s forward and apply the update.

        Returns the gradient of the stage's input (None when ``input_grad`` is off) and the
        batch's staleness (updates applied since its forward).

        Raises:
            KeyError: no pending forward for ``key``.
        """
        pending = self._pending.pop(key)
        staleness = self.version - pending.version
        live = self._params
        wrt = list(pending.params.values()) if pending.params is not None else list(live.values())
        if self.input_grad:
            wrt = [pending.inputs, *wrt]
        outputs, grads_out = [pending.output], [self._in(grad_output)]
        if self.local_loss is not None:
            outputs.append(self.local_loss(pending.inputs, pending.output))
            grads_out.append(torch.ones((), device=self.device))
        grads = torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True)
        grad_input = grads[0] if self.input_grad else None
        param_grads = grads[1:] if self.input_grad else grads
        for (name, p), g in zip(live.items(), param_grads):
            if g is not None and pending.params is not None:
                g = self.correction.correct(g, p.detach(), pending.params[name].detach(), staleness)
            p.grad = g
        self._step()
        return (grad_input.cpu() if grad_input is not None else None), staleness

    def loss_step(self, x: torch.Tensor, labels: torch.Tensor) -> LossStep:
        """Last stage: forward, loss, backward and update in one go (no stash needed)."""
        if self.loss is None:
            raise RuntimeError("loss_step on a stage without a loss")
        inputs = self._in(x).detach().requires_grad_(self.input_grad)
        output: torch.Tensor = self.segment(inputs)
        loss = self.loss(output, self._in(labels))
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        self._step()
        grad = inputs.grad.cpu() if self.input_grad and inputs.grad is not None else None
        return LossStep(float(loss.detach()), output.detach().cpu(), grad)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation forward pass: no graph, no stash; the output on the CPU."""
        with torch.no_grad():
            out: torch.Tensor = self.segment(self._in(x))
        return out.cpu()

    def eval_loss(self, output: torch.Tensor, labels: torch.Tensor) -> float:
        """The batch's mean loss for an evaluation output (NaN without a loss)."""
        if self.loss is None:
            return float("nan")
        with torch.no_grad():
            return float(self.loss(output, labels))

    def output_shape(self, key: Hashable) -> tuple[int, ...]:
        """Shape of batch ``key``'s output: the shape its gradient must have."""
        return tuple(self._pending[key].output.shape)

    def holds(self, key: Hashable) -> bool:
        return key in self._pending

    def discard(self, key: Hashable) -> None:
        """Forget a batch whose gradient will never come (e.g. a skipped vertical batch)."""
        self._pending.pop(key, None)

    def _step(self) -> None:
        if self.schedule is not None:
            factor = self.schedule(self.version)
            for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                group["lr"] = base * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the weights in place (an average, a merged replica); later batches stash the new ones."""
        self.segment.load_state_dict(weights)
        self._stash = None

    def state(self) -> dict[str, Any]:
        """Weights, optimizer state and version, for a checkpoint (weights_only-loadable)."""
        return {"segment": self.segment.state_dict(), "optimizer": self.optimizer.state_dict(),
                "version": self.version}

    def load_state(self, state: dict[str, Any]) -> None:
        self.segment.load_state_dict(state["segment"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self._pending.clear()
        self._stash = None
