"""The one stage abstraction: a model segment with its optimizer (and, if last, its loss).

A stage turns a forward input into an output (keeping what backward needs under a key),
and turns the gradient of that output into an update and the gradient of its input. The
last stage also owns the loss. Bottom, middle and top segments, U-shaped heads and the
parties of a vertical split are all Stages; the roles around them only move messages.

With several batches in flight a stage applies each gradient against the weights that
produced its batch (weight stashing, as in PipeDream), copy-on-write: ``forward`` runs the
live module and notes which weights autograd kept for the backward (``_Snapshot``); only when
an update (or a load) is about to overwrite weights that a batch still in flight needs are
they copied, once per weight version, and that batch's backward reads the copy. ``backward``
differentiates with the weights that made the batch and hands the result, corrected for
staleness, to the optimizer of the live weights. Any optimizer works this way: the stash
changes which gradient is computed, not how it is applied. Batches forwarded between two
updates share one copy (with coalescing, a bundle's batches usually are); a batch answered
before the next update (K=1) costs no copy; and only what autograd or the correction reads is
copied (delay compensation reads every weight; the first layer's weight is otherwise unused).
Weights must change in place (every torch optimizer and ``load_state_dict`` do).

Tensors cross the stage boundary on the CPU; a stage on a GPU moves each batch's input
there once and its output (or input gradient) back once.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from torch import nn

from splitmq.shared.losses import Loss
from splitmq.shared.optim import OptimizerSpec
from splitmq.shared.staleness import NoCorrection, StalenessCorrection


class _Snapshot:
    """One weight version as the batches forwarded at it need it: how many still await a gradient,
    which weights' storages their graphs hold (``saved``), and the copies of them taken before an
    update overwrote them."""

    __slots__ = ("pending", "saved", "copies")

    def __init__(self) -> None:
        self.pending = 0                                   # batches of this version still awaiting a gradient
        self.saved: set[int] = set()                       # data_ptr of live storages the graphs hold
        self.copies: dict[int, torch.UntypedStorage] = {}  # data_ptr of a live storage -> its copy

    def storage(self, live: torch.UntypedStorage) -> torch.UntypedStorage:
        """This version's bytes of a live storage: its copy if taken, else the live (unchanged) one."""
        return self.copies.get(live.data_ptr(), live)


@dataclass
class _Pending:
    inputs: torch.Tensor                       # leaf; requires grad when the stage returns input grads
    output: torch.Tensor                       # carries the autograd graph
    snapshot: _Snapshot | None                 # the weights that made it (None: no stashing)
    version: int                               # optimizer updates applied before this forward


def _view(storage: torch.UntypedStorage, like: torch.Tensor | tuple[torch.dtype, torch.Size, tuple[int, ...], int]
          ) -> torch.Tensor:
    """A tensor over ``storage`` with the dtype, shape, strides and offset of ``like``."""
    dtype, size, stride, offset = (like.dtype, like.size(), like.stride(), like.storage_offset()) \
        if isinstance(like, torch.Tensor) else like
    return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, size, stride)


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
        #: The parameters' storages by address (updated in place, so fixed), for the stash's hooks.
        self._storages = {p.untyped_storage().data_ptr(): p.untyped_storage()
                          for p in self._params.values() if p.numel()}
        #: Buffers the forward itself updates in place (batch norm's running statistics): a training
        #: backward does not read them, so their change is not an error (autograd's own check says it is).
        self._buffers = {b.untyped_storage().data_ptr() for b in self.segment.buffers() if b.numel()}
        self._snapshot: _Snapshot | None = None  # the current version's, once a batch was forwarded at it

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True) if x.device != self.device else x

    def forward(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """Training forward pass; the result is detached (on the CPU), the graph kept under ``key``."""
        inputs = self._in(x).detach().requires_grad_(self.input_grad)
        snapshot = None
        if self.stash_weights:
            if self._snapshot is None:
                self._snapshot = _Snapshot()
            snapshot = self._snapshot
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, snapshot), self._unpack):
                output: torch.Tensor = self.segment(inputs)
            snapshot.pending += 1
        else:
            output = self.segment(inputs)
        self._pending[key] = _Pending(inputs, output, snapshot, self.version)
        return output.detach().cpu()

    def _pack(self, snapshot: _Snapshot, t: torch.Tensor) -> Any:
        """Autograd keeps ``t`` for the backward: a live weight (or a view of one) is kept as where
        it lies, to be read from ``snapshot``'s copy if an update overwrites it meanwhile."""
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._storages:
            return t, t._version
        snapshot.saved.add(ptr)
        return snapshot, ptr, (t.dtype, t.size(), t.stride(), t.storage_offset())

    def _unpack(self, packed: Any) -> torch.Tensor:
        """Raises:
            RuntimeError: a kept tensor other than a weight or a buffer was changed in place since
                the forward (what autograd's own check raises; the hooks replace that check)."""
        if len(packed) == 2:
            t, version = packed
            if t._version != version and t.untyped_storage().data_ptr() not in self._buffers:
                raise RuntimeError(f"a tensor of shape {tuple(t.shape)} kept for the backward was modified in "
                                   f"place since the forward (version {t._version}, expected {version})")
            return t  # type: ignore[no-any-return]
        snapshot, ptr, layout = packed
        return _view(snapshot.storage(self._storages[ptr]), layout)

    def _preserve(self) -> None:
        """Before the live weights change: copy what the current version's batches in flight still need."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None or snapshot.pending == 0:
            return
        needed = self._storages if self.correction.reads_old_weights else snapshot.saved
        snapshot.copies = {ptr: self._storages[ptr].clone() for ptr in needed}  # type: ignore[no-untyped-call]

    def _done(self, pending: _Pending) -> None:
        if pending.snapshot is not None:
            pending.snapshot.pending -= 1

    def backward(self, key: Hashable, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """Backprop ``grad_output`` through batch ``key``'s forward and apply the update.

        Returns the gradient of the stage's input (None when ``input_grad`` is off) and the
        batch's staleness (updates applied since its forward).

        Raises:
            KeyError: no pending forward for ``key``.
        """
        pending = self._pending.pop(key)
        self._done(pending)
        staleness = self.version - pending.version
        live = self._params
        wrt: list[torch.Tensor] = list(live.values())
        if self.input_grad:
            wrt = [pending.inputs, *wrt]
        outputs, grads_out = [pending.output], [self._in(grad_output)]
        if self.local_loss is not None:
            outputs.append(self.local_loss(pending.inputs, pending.output))
            grads_out.append(torch.ones((), device=self.device))
        grads = torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True)
        grad_input = grads[0] if self.input_grad else None
        param_grads = grads[1:] if self.input_grad else grads
        snapshot = pending.snapshot
        for p, g in zip(live.values(), param_grads):
            if g is not None and snapshot is not None and staleness:
                old = _view(snapshot.storage(p.untyped_storage()), p)
                g = self.correction.correct(g, p.detach(), old, staleness)
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
        pending = self._pending.pop(key, None)
        if pending is not None:
            self._done(pending)

    def _step(self) -> None:
        if self.schedule is not None:
            factor = self.schedule(self.version)
            for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                group["lr"] = base * factor
        self._preserve()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the weights in place (an average, a merged replica); batches in flight keep the old ones."""
        self._preserve()
        self.segment.load_state_dict(weights)

    def state(self) -> dict[str, Any]:
        """Weights, optimizer state and version, for a checkpoint (weights_only-loadable)."""
        return {"segment": self.segment.state_dict(), "optimizer": self.optimizer.state_dict(),
                "version": self.version}

    def load_state(self, state: dict[str, Any]) -> None:
        self.segment.load_state_dict(state["segment"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self._pending.clear()
        self._snapshot = None
