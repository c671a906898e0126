"""Validation of decoded messages before they touch a model. Pure functions, no broker.

Every failure raises ``RejectedMessage(reason, detail)``; ``reason`` is one of
``shared.metrics.REJECT_REASONS`` so it can label a metric and a dead-letter header.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitmq.shared import topology
from splitmq.shared.errors import DecodeError, RejectedMessage
from splitmq.shared.wire import ENVELOPE_BYTES, MAX_MESSAGE_BYTES, Forward


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. The sum is checked first: any NaN or Inf makes it non-finite, and
    one reduction costs ~30x less than ``isfinite(t).all()`` on this torch build; only a sum that
    overflowed from finite values needs the element-wise check."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


#: Labels are class indices (int64) or regression targets (float32).
LABEL_DTYPES = frozenset({torch.int64, torch.float32})


@dataclass(frozen=True)
class Limits:
    """What a stage accepts: its job, the per-sample cut shape, the largest batch."""

    job_id: str
    cut_shape: tuple[int, ...]
    max_batch: int
    dtypes: frozenset[torch.dtype] = frozenset({torch.float32})

    def __post_init__(self) -> None:
        topology.check_name("job", self.job_id)
        if not self.cut_shape or any(d < 1 for d in self.cut_shape):
            raise ValueError(f"cut_shape must be positive dimensions, got {self.cut_shape}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    def max_body_bytes(self) -> int:
        """The largest body a valid forward message can have: full batch at 8 bytes per value,
        labels and sample ids, plus room for the envelope. Anything bigger is refused unread."""
        values = self.max_batch * math.prod(self.cut_shape)
        return min(MAX_MESSAGE_BYTES, 8 * values + 16 * self.max_batch + ENVELOPE_BYTES)


def decode_reason(exc: DecodeError) -> str:
    """The metric label of a decode failure (wire's messages name schema and kind problems)."""
    text = str(exc)
    if text.startswith("unsupported schema"):
        return "schema"
    if text.startswith("unknown message kind"):
        return "kind"
    if "exceeds the" in text and "cap" in text:
        return "size"
    return "decode"


def check_forward(msg: Forward, limits: Limits) -> None:
    """Raises RejectedMessage unless ``msg`` is a forward message this stage can use."""
    if msg.job_id != limits.job_id:
        raise RejectedMessage("job", f"job {msg.job_id!r}, expected {limits.job_id!r}")
    _check_client_name(msg.client_id)
    a = msg.activations
    if a.dtype not in limits.dtypes:
        raise RejectedMessage("dtype", f"activations dtype {a.dtype}")
    if tuple(a.shape[1:]) != limits.cut_shape or a.dim() != len(limits.cut_shape) + 1:
        raise RejectedMessage("shape", f"activations shape {tuple(a.shape)}, expected (B, {limits.cut_shape})")
    if not 1 <= a.shape[0] <= limits.max_batch:
        raise RejectedMessage("batch_size", f"batch of {a.shape[0]}, allowed 1..{limits.max_batch}")
    ids = msg.sample_ids
    if ids is not None and (ids.dtype != torch.int64 or tuple(ids.shape) != (a.shape[0],)):
        raise RejectedMessage("shape", f"sample_ids must be int64 of shape ({a.shape[0]},)")
    labels = msg.labels
    if labels is not None:
        if labels.dtype not in LABEL_DTYPES or labels.dim() < 1 or labels.shape[0] != a.shape[0]:
            raise RejectedMessage("shape", f"labels must be one per sample ({a.shape[0]}), int64 classes or float "
                                           f"targets; got {labels.dtype} {tuple(labels.shape)}")
        if not all_finite(labels):
            raise RejectedMessage("non_finite", "labels contain NaN or Inf")
    if not all_finite(a):
        raise RejectedMessage("non_finite", "activations contain NaN or Inf")
    if not math.isfinite(msg.created_at):
        raise RejectedMessage("non_finite", f"created_at is {msg.created_at}")
    if msg.seq < 0 or msg.model_version < 0:
        raise RejectedMessage("sequence", f"negative sequence {msg.seq} or model version {msg.model_version}")


def _check_client_name(client_id: str) -> None:
    # The trainer routes the reply by this name: a dot or wildcard in it must never reach topology.
    try:
        topology.check_name("client", client_id)
    except ValueError as exc:
        raise RejectedMessage("identity", str(exc)) from None


def check_gradient(grad: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Returns ``grad`` if it is a finite float32 gradient of ``shape`` (the activations we sent).

    Raises:
        RejectedMessage: missing, of another dtype or shape, or with NaN or Inf in it.
    """
    if grad is None:
        raise RejectedMessage("shape", "an applied batch's answer has no gradient")
    if grad.dtype != torch.float32:
        raise RejectedMessage("dtype", f"gradient dtype {grad.dtype}")
    if tuple(grad.shape) != shape:
        raise RejectedMessage("shape", f"gradient shape {tuple(grad.shape)}, expected {shape}")
    if not all_finite(grad):
        raise RejectedMessage("non_finite", "gradient contains NaN or Inf")
    return grad


