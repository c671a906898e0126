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
``topk`` sends each row's ``topk_fraction`` largest values (float32, ``(B, k)``), their positions
in the row (``*_index``: ``(B, k)``, increasing; int16 when a row has at most 32,767 values, else
int32) and the row's shape (``*_shape``); the rest is zero. With ``topk_feedback`` the owner keeps what it left out of each sample's activations
and adds it the next time that sample is sent (error feedback, keyed by sample id; a gradient has
no sample id to key it by). Measured on the MNIST MLP it costs accuracy, because the top then
learns from inputs unlike the plain top-k ones it is evaluated and served with: an option, off.

Each codec is a small class with one ``encode`` and one ``decode``: numeric code in pure
functions, tested on plain tensors without a broker (``tests/shared/test_codec.py``).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

import numpy
import torch

from splitmq.shared import wire
from splitmq.shared.config import Compression
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.tensors import MAX_NDIM

#: What travels beside a payload, by the suffix of its wire field (``activations_scale``, ``grad_index``).
Extras = dict[str, torch.Tensor]
_Cut = TypeVar("_Cut", wire.Forward, wire.Backward)

#: int8 levels on each side of zero; -128 is never sent, so the code is symmetric.
INT8_LEVELS = 127
#: Smallest row maximum quantised with full relative precision (far below any activation or gradient).
_TINY = 1e-30
#: Largest position an int16 top-k index holds.
_INT16_MAX = 32767


class TensorCodec(ABC):
    """How one float32 tensor travels: a payload tensor and, for some codecs, a per-row scale."""

    #: The ``Compression`` value (the job setting) this codec implements.
    setting: Compression

    #: The wire fields beside the payload this codec sends (``scale``, ``index``, ``shape``).
    extras: tuple[str, ...] = ()

    @abstractmethod
    def encode(self, t: torch.Tensor, batch: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, Extras]:
        """``(payload, extras)`` to put on the wire for float32 ``t``; ``batch`` = (sample ids, seq)
        of a training batch, for a codec that remembers samples (top-k's error feedback)."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, extras: Extras, what: str) -> torch.Tensor:
        """The float32 tensor a peer sent as ``payload`` and ``extras`` (only this codec's are given).

        Raises:
            RejectedMessage: ``dtype`` (not this codec's payload), ``shape`` (an extra of the wrong
                shape, missing, or a value out of range), ``non_finite`` (a scale with NaN or Inf).
        """


class Plain(TensorCodec):
    """float32 as it is (no compression). What arrives is left to the role's own checks."""

    setting = Compression.NONE

    def encode(self, t: torch.Tensor, batch: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, Extras]:
        return t, {}

    def decode(self, payload: torch.Tensor, extras: Extras, what: str) -> torch.Tensor:
        return payload


class Half(TensorCodec):
    """float16 or bfloat16 on the wire: two bytes a value."""

    def __init__(self, setting: Compression) -> None:
        self.setting = setting
        self.dtype = torch.float16 if setting is Compression.FP16 else torch.bfloat16

    def encode(self, t: torch.Tensor, batch: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, Extras]:
        return t.detach().to(self.dtype), {}

    def decode(self, payload: torch.Tensor, extras: Extras, what: str) -> torch.Tensor:
        _dtype(payload, self.dtype, what, self.setting)
        return payload.float()


class Int8Rows(TensorCodec):
    """int8 with one float32 scale per row (the first dimension: one per sample)."""

    setting = Compression.INT8
    extras = ("scale",)

    def encode(self, t: torch.Tensor, batch: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, Extras]:
        q, scale = quantize_rows(t)
        return q, {"scale": scale}

    def decode(self, payload: torch.Tensor, extras: Extras, what: str) -> torch.Tensor:
        _dtype(payload, torch.int8, what, self.setting)
        scale = extras.get("scale")
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


class TopK(TensorCodec):
    """Each row's largest values by magnitude, their positions and the row's shape; zero elsewhere.

    With ``feedback`` (activations) the part of each training sample left out is remembered by
    sample id and added to that sample's next send, so nothing is dropped for good, only late.
    """

    setting = Compression.TOPK
    extras = ("index", "shape")

    def __init__(self, fraction: float, *, feedback: bool) -> None:
        self.fraction = fraction
        self.feedback = _Feedback() if feedback else None

    def encode(self, t: torch.Tensor, batch: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, Extras]:
        if t.dim() == 0:
            raise ValueError("topk compression needs a tensor with rows (at least one dimension)")
        rows = t.detach().float().reshape(t.shape[0], -1)  # (B, values per sample)
        slots = None
        if self.feedback is not None and batch is not None:
            rows, slots = self.feedback.add(rows, *batch)
        values, index = sparsify_rows(rows, self.fraction)
        if self.feedback is not None and slots is not None:
            self.feedback.keep(slots, rows, index)
        return values, {"index": index, "shape": torch.tensor(t.shape[1:], dtype=torch.int64)}

    def decode(self, payload: torch.Tensor, extras: Extras, what: str) -> torch.Tensor:
        return densify_rows(payload, extras.get("index"), extras.get("shape"), what)


class _Feedback:
    """Error feedback by sample: what top-k left out of each sample's last send (``residual``).

    A batch sent again under the same seq (a re-send) starts from the residual it started from the
    first time (``before``), so a re-send does not count what it leaves out twice. The memory is
    not checkpointed: after a restart every sample starts from nothing left over. It holds two
    float32 rows per sample the owner holds.
    """

    def __init__(self) -> None:
        self.slots: dict[int, int] = {}
        self.residual = torch.zeros(0, 0)
        self.before = torch.zeros(0, 0)
        self.seq = torch.zeros(0, dtype=torch.int64)

    def add(self, x: torch.Tensor, ids: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, n) plus what each of its samples still owes, and the samples' slots (for ``keep``)."""
        slots = [self.slots.setdefault(int(i), len(self.slots)) for i in ids.tolist()]
        self._grow(len(self.slots), x.shape[1])
        rows = torch.tensor(slots, dtype=torch.int64)
        again = (self.seq[rows] == seq).unsqueeze(1)
        start = torch.where(again, self.before[rows], self.residual[rows])
        self.before[rows] = start
        self.seq[rows] = seq
        return x + start, rows

    def keep(self, slots: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> None:
        """Remember what the send of ``x`` left out: ``x`` with the values sent (at ``index``) zeroed."""
        self.residual[slots] = x.scatter(1, index.long(), 0.0)

    def _grow(self, samples: int, width: int) -> None:
        if self.residual.shape[1] not in (0, width):
            raise ValueError(f"a row of {width} values after rows of {self.residual.shape[1]}: one cut per codec")
        have = self.residual.shape[0]
        if samples <= have:
            return
        more = max(samples, 2 * have) - have
        self.residual = torch.cat([self.residual.reshape(have, width), torch.zeros(more, width)])
        self.before = torch.cat([self.before.reshape(have, width), torch.zeros(more, width)])
        self.seq = torch.cat([self.seq, torch.full((more,), -1, dtype=torch.int64)])


def sparsify_rows(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, index)``: each row of ``x`` (B, n)'s ``ceil(fraction × n)`` largest values by
    magnitude (float32, (B, k)) and their positions ((B, k), increasing along the row; int16 if
    they fit, else int32). A NaN counts as the largest, so it travels and the receiver refuses it."""
    n = x.shape[1]
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    rows = x.detach().contiguous().numpy()
    # numpy's introselect: 250 µs for (64, 640) where torch.topk takes 400 on this build (docs/benchmarks.md)
    index = numpy.argpartition(numpy.abs(rows), n - k, axis=1)[:, n - k:] if n else numpy.zeros((len(rows), 0), int)
    index.sort(axis=1)  # (B, k), increasing: the receiver checks order instead of sorting
    values = torch.from_numpy(numpy.take_along_axis(rows, index, axis=1))
    return values, torch.from_numpy(index.astype(numpy.int16 if n <= _INT16_MAX + 1 else numpy.int32))


def densify_rows(values: torch.Tensor, index: torch.Tensor | None, shape: torch.Tensor | None,
                 what: str) -> torch.Tensor:
    """The float32 (B, *shape) tensor whose row r holds ``values[r]`` at ``index[r]`` and zero elsewhere.

    Raises:
        RejectedMessage: ``dtype`` or ``shape`` for anything that is not a well-formed top-k tensor
            within the message size cap (positions out of the row, repeated or unordered included).
    """
    _dtype(values, torch.float32, what, Compression.TOPK)
    if index is None or shape is None or index.dtype not in (torch.int16, torch.int32) or shape.dtype != torch.int64:
        raise RejectedMessage("shape", f"{what} travel as topk with an int16 or int32 {what}_index and an int64 "
                                       f"{what}_shape (compress = topk); got index {_desc(index)}, shape {_desc(shape)}")
    dims = shape.tolist()
    if values.dim() != 2 or index.shape != values.shape or shape.dim() != 1 or not 1 <= len(dims) < MAX_NDIM \
            or any(d < 1 for d in dims):
        raise RejectedMessage("shape", f"topk {what}: values {tuple(values.shape)} and index {tuple(index.shape)} "
                                       f"must both be (B, k) and the row shape {dims} positive")
    rows, n = values.shape[0], math.prod(dims)
    if rows * n * 4 > wire.MAX_MESSAGE_BYTES or values.shape[1] > n:
        raise RejectedMessage("shape", f"topk {what}: {values.shape[1]} of {n} values per row in {rows} rows "
                                       f"(at most {wire.MAX_MESSAGE_BYTES} bytes decoded)")
    positions = index.long()
    if values.shape[1] and (positions.min() < 0 or positions.max() >= n
                            or bool((positions[:, 1:] <= positions[:, :-1]).any())):
        raise RejectedMessage("shape", f"topk {what}_index must hold increasing positions in 0..{n - 1} per row")
    out = torch.zeros(rows, n)
    return out.scatter_(1, positions, values).view(rows, *dims)


def _desc(t: torch.Tensor | None) -> str:
    return "none" if t is None else f"{t.dtype} {tuple(t.shape)}"


def codec_for(setting: Compression, *, topk_fraction: float = 0.1, feedback: bool = False) -> TensorCodec:
    """The codec of one job setting (``feedback``: top-k remembers what it left out, by sample)."""
    if setting is Compression.NONE:
        return Plain()
    if setting is Compression.INT8:
        return Int8Rows()
    if setting is Compression.TOPK:
        return TopK(topk_fraction, feedback=feedback)
    return Half(setting)


@dataclass(frozen=True)
class CutCodec:
    """A job's two codecs, applied by the loop to every ``forward`` and ``backward`` it sends and takes."""

    activations: TensorCodec
    gradients: TensorCodec

    @classmethod
    def for_spec(cls, spec: Mapping[str, Any]) -> CutCodec:
        """From a party's agreed spec (``JobConfig.agreed()``); a setting it lacks is ``none``."""
        fraction = float(spec.get("topk_fraction", 0.1))
        return cls(codec_for(Compression(spec.get("compress_activations", Compression.NONE.value)),
                             topk_fraction=fraction, feedback=bool(spec.get("topk_feedback", False))),
                   codec_for(Compression(spec.get("compress_gradients", Compression.NONE.value)),
                             topk_fraction=fraction))

    @property
    def active(self) -> bool:
        return self.activations.setting is not Compression.NONE or self.gradients.setting is not Compression.NONE

    def outgoing(self, msg: wire.Message) -> wire.Message:
        """``msg`` as it goes on the wire: its cut tensor encoded (other messages unchanged)."""
        if isinstance(msg, wire.Forward) and self.activations.setting is not Compression.NONE:
            batch = (msg.sample_ids, msg.seq) if msg.train and msg.sample_ids is not None else None
            payload, extras = self.activations.encode(msg.activations, batch)
            return msg.copy(activations=payload, **{f"activations_{k}": v for k, v in extras.items()})
        if isinstance(msg, wire.Backward) and msg.grad is not None and self.gradients.setting is not Compression.NONE:
            payload, extras = self.gradients.encode(msg.grad)
            return msg.copy(grad=payload, **{f"grad_{k}": v for k, v in extras.items()})
        return msg

    def incoming(self, msg: wire.AnyMessage) -> wire.AnyMessage:
        """``msg`` as its role takes it: its cut tensor float32 again.

        Raises:
            RejectedMessage: the tensor does not travel the way this job agreed (see ``decode``).
        """
        if isinstance(msg, wire.Forward):
            return self._incoming(msg, "activations", self.activations)
        if isinstance(msg, wire.Backward) and (msg.grad is not None or _extras(msg, "grad")):
            if msg.grad is None:
                raise RejectedMessage("shape", f"{', '.join(f'grad_{k}' for k in _extras(msg, 'grad'))} without a grad")
            return self._incoming(msg, "grad", self.gradients)
        return msg

    def _incoming(self, msg: _Cut, what: str, tensor_codec: TensorCodec) -> _Cut:
        extras = _extras(msg, what)
        stray = sorted(set(extras) - set(tensor_codec.extras))
        if stray:
            raise RejectedMessage("shape", f"a {what}_{stray[0]} came, but this job sends {what} as "
                                           f"{tensor_codec.setting.value}")
        payload = getattr(msg, what)
        decoded = tensor_codec.decode(payload, extras, what)
        if decoded is payload and not extras:
            return msg
        return msg.copy(**{what: decoded, **{f"{what}_{k}": None for k in extras}})


def _extras(msg: wire.Forward | wire.Backward, what: str) -> Extras:
    """The extras a message carries beside its ``what`` tensor."""
    out = {k: getattr(msg, f"{what}_{k}") for k in _EXTRAS}
    return {k: v for k, v in out.items() if v is not None}


#: Every extra a cut tensor may carry on the wire (``wire.Forward.activations_*``, ``wire.Backward.grad_*``).
_EXTRAS = ("scale", "index", "shape")


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
