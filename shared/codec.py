"""Compression at the cut: how activations and gradients travel, chosen per job and agreed at join.

The party loop (``splitmq.workers.party``) is the only user: it encodes a ``forward``'s
activations and a ``backward``'s gradient just before a message is published, and decodes them
just after the gate, so roles, validation and the ``Stage`` only ever see float32. Activations
and gradients have separate settings (``compress_activations``, ``compress_gradients``): both
are part of the agreed job spec, so a party whose choice differs is refused at join with the
listed differences.

On the wire (docs/protocol.md, "Compression at the cut"): ``fp16`` / ``bf16`` send the tensor in
that dtype; ``int8`` sends an int8 tensor of the same shape plus a float32 scale per row (one per
sample, ``activations_scale`` / ``grad_scale``), the value being ``q × scale``. The scale is
``max |row| / 127``, so the error of any value is at most half a step: ``max |row| / 254``.

Each codec is a small class with one ``encode`` and one ``decode``: numeric code in pure
functions, tested on plain tensors without a broker (``tests/shared/test_codec.py``).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from splitmq.shared import wire
from splitmq.shared.config import Compression
from splitmq.shared.errors import RejectedMessage

#: int8 levels on each side of zero; -128 is never sent, so the code is symmetric.
INT8_LEVELS = 127
#: Smallest row maximum quantised with full relative precision (far below any activation or gradient).
_TINY = 1e-30


class TensorCodec(ABC):
    """How one float32 tensor travels: a payload tensor and, for some codecs, a per-row scale."""

    #: The ``Compression`` value (the job setting) this codec implements.
    setting: Compression

    @abstractmethod
    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(payload, scale)`` to put on the wire for float32 ``t`` (scale None: none travels)."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, scale: torch.Tensor | None, what: str) -> torch.Tensor:
        """The float32 tensor a peer sent as ``payload`` (and ``scale``).

        Raises:
            RejectedMessage: ``dtype`` (not this codec's payload), ``shape`` (a scale of the wrong
                shape, or one where none belongs), ``non_finite`` (a scale with NaN or Inf).
        """


class Plain(TensorCodec):
    """float32 as it is (no compression). What arrives is left to the role's own checks."""

    setting = Compression.NONE

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return t, None

    def decode(self, payload: torch.Tensor, scale: torch.Tensor | None, what: str) -> torch.Tensor:
        _no_scale(scale, what, self.setting)
        return payload


class Half(TensorCodec):
    """float16 or bfloat16 on the wire: two bytes a value."""

    def __init__(self, setting: Compression) -> None:
        self.setting = setting
        self.dtype = torch.float16 if setting is Compression.FP16 else torch.bfloat16

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return t.detach().to(self.dtype), None

    def decode(self, payload: torch.Tensor, scale: torch.Tensor | None, what: str) -> torch.Tensor:
        _no_scale(scale, what, self.setting)
        _dtype(payload, self.dtype, what, self.setting)
        return payload.float()


class Int8Rows(TensorCodec):
    """int8 with one float32 scale per row (the first dimension: one per sample)."""

    setting = Compression.INT8

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return quantize_rows(t)

    def decode(self, payload: torch.Tensor, scale: torch.Tensor | None, what: str) -> torch.Tensor:
        _dtype(payload, torch.int8, what, self.setting)
        rows = payload.shape[0] if payload.dim() else -1
        if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
            got = "none" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
            raise RejectedMessage("shape", f"{what} travel as int8 with a float32 {what}_scale of shape "
                                           f"({rows},) (compress = int8); got {got}")
        if scale.numel() and not math.isfinite(float(scale.sum())):
            raise RejectedMessage("non_finite", f"{what}_scale contains NaN or Inf")
        return dequantize_rows(payload, scale)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: int8 ``q`` of ``t``'s shape and float32 ``scale`` of shape ``(rows,)`` with
    ``t ≈ q × scale`` row by row. A NaN or Inf in a row makes its scale non-finite, so the
    receiver refuses it rather than train on it.

    Raises:
        ValueError: ``t`` has no rows (zero dimensions).
    """
    if t.dim() == 0:
        raise ValueError("int8 compression needs a tensor with rows (at least one dimension)")
    rows = t.shape[0]
    x = t.detach().float().reshape(rows, -1)  # (B, values per sample); may share t's storage: no in-place ops
    if x.numel() == 0:
        return torch.zeros(t.shape, dtype=torch.int8), torch.zeros(rows)
    amax = x.abs().amax(dim=1)  # (B,)
    # |x| * 127 / amax <= 127 by construction, so no clamp; the floor keeps an all-zero row at 0 (not 0/0),
    # and only rows below 1e-30 (zero for any model) lose their relative precision.
    q = (x * (INT8_LEVELS / amax.clamp_min(_TINY)).unsqueeze(1)).round_().to(torch.int8)
    return q.view(t.shape), amax / INT8_LEVELS


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q × scale``, the scale taken per row (first dimension)."""
    rows = q.shape[0]
    return q.reshape(rows, -1).float().mul_(scale.unsqueeze(1)).view(q.shape)  # (B, ...) again


def codec_for(setting: Compression) -> TensorCodec:
    """The codec of one job setting."""
    if setting is Compression.NONE:
        return Plain()
    if setting is Compression.INT8:
        return Int8Rows()
    return Half(setting)


@dataclass(frozen=True)
class CutCodec:
    """A job's two codecs, applied by the loop to every ``forward`` and ``backward`` it sends and takes."""

    activations: TensorCodec
    gradients: TensorCodec

    @classmethod
    def for_spec(cls, spec: Mapping[str, Any]) -> CutCodec:
        """From a party's agreed spec (``JobConfig.agreed()``); a setting it lacks is ``none``."""
        return cls(codec_for(Compression(spec.get("compress_activations", Compression.NONE.value))),
                   codec_for(Compression(spec.get("compress_gradients", Compression.NONE.value))))

    @property
    def active(self) -> bool:
        return self.activations.setting is not Compression.NONE or self.gradients.setting is not Compression.NONE

    def outgoing(self, msg: wire.Message) -> wire.Message:
        """``msg`` as it goes on the wire: its cut tensor encoded (other messages unchanged)."""
        if isinstance(msg, wire.Forward) and self.activations.setting is not Compression.NONE:
            payload, scale = self.activations.encode(msg.activations)
            return msg.copy(activations=payload, activations_scale=scale)
        if isinstance(msg, wire.Backward) and msg.grad is not None and self.gradients.setting is not Compression.NONE:
            payload, scale = self.gradients.encode(msg.grad)
            return msg.copy(grad=payload, grad_scale=scale)
        return msg

    def incoming(self, msg: wire.AnyMessage) -> wire.AnyMessage:
        """``msg`` as its role takes it: its cut tensor float32 again.

        Raises:
            RejectedMessage: the tensor does not travel the way this job agreed (see ``decode``).
        """
        if isinstance(msg, wire.Forward):
            acts = self.activations.decode(msg.activations, msg.activations_scale, "activations")
            return msg if acts is msg.activations and msg.activations_scale is None else \
                msg.copy(activations=acts, activations_scale=None)
        if isinstance(msg, wire.Backward) and (msg.grad is not None or msg.grad_scale is not None):
            if msg.grad is None:
                raise RejectedMessage("shape", "grad_scale without a grad")
            grad = self.gradients.decode(msg.grad, msg.grad_scale, "grad")
            return msg if grad is msg.grad and msg.grad_scale is None else msg.copy(grad=grad, grad_scale=None)
        return msg


def _no_scale(scale: torch.Tensor | None, what: str, setting: Compression) -> None:
    if scale is not None:
        raise RejectedMessage("shape", f"a {what}_scale came, but this job sends {what} as {setting.value}")


def _dtype(payload: torch.Tensor, dtype: torch.dtype, what: str, setting: Compression) -> None:
    if payload.dtype != dtype:
        raise RejectedMessage("dtype", f"{what} dtype {payload.dtype}; this job sends them as {setting.value} "
                                       f"({str(dtype).removeprefix('torch.')})")


def cut_samples(msg: wire.Message) -> int:
    """Training samples whose cut tensor ``msg`` carries (0: not a training cut message), for
    the bytes-per-sample figure (``splitmq_cut_bytes_per_sample``)."""
    if isinstance(msg, wire.Forward) and msg.train and msg.activations.dim():
        return int(msg.activations.shape[0])
    if isinstance(msg, wire.Backward) and msg.grad is not None and msg.grad.dim():
        return int(msg.grad.shape[0])
    return 0
