"""The one wire format: msgpack envelopes carrying tensors as dtype + shape + raw bytes.

Every message a peer sends is one of the frozen dataclasses below. ``encode()`` gives the
bytes to publish; ``decode(body)`` turns bytes back into the right dataclass or raises
``DecodeError``. No pickle: a peer's bytes are data, never code. The byte-level layout is
specified in ``docs/protocol.md``.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Mapping, TypeVar, Union

import msgpack
import torch

from splitmq.shared.errors import DecodeError

SCHEMA_VERSION = 1

#: Hard cap on one message's size; larger bodies are refused before unpacking.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Cap on the number of dimensions of one tensor.
MAX_NDIM = 8

#: Wire dtype name -> (torch dtype, item size). Little-endian on the wire.
DTYPES: Mapping[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "float64": (torch.float64, 8),
    "int64": (torch.int64, 8),
    "int32": (torch.int32, 4),
    "uint8": (torch.uint8, 1),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
# Decoded tensors are views of the message's immutable bytes; torch warns that it cannot mark
# them read-only. Filtered once here (a per-call catch_warnings costs more than the decode).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class Kind(str, Enum):
    """What a message is; the ``kind`` field on the wire."""

    FORWARD = "forward"    # activations going up the chain (or a batch to evaluate)
    BACKWARD = "backward"  # gradient of a forward message's activations, going back down
    WEIGHTS = "weights"    # a segment's parameters (hand-off or averaging between owners)
    HELLO = "hello"        # a party's job spec when it joins, and the peer's answer


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    """Lay a tensor out as ``{"dtype", "shape", "data"}`` without an extra copy when contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {t.dtype} cannot travel; allowed: {sorted(DTYPES)}")
    t = t.contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
    return {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data": data}


def decode_tensor(obj: Any, name: str) -> torch.Tensor:
    """Rebuild a tensor from its wire form, sharing the message's buffer (treat it read-only)."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise DecodeError(f"tensor {name!r} must be a map of exactly dtype, shape, data")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise DecodeError(f"tensor {name!r} has dtype {dtype_name!r}; allowed: {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
        type(d) is int and 0 <= d <= MAX_MESSAGE_BYTES for d in shape
    ) or math.prod(max(d, 1) for d in shape) > MAX_MESSAGE_BYTES:  # torch overflows even at numel 0
        raise DecodeError(f"tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(data, bytes):
        raise DecodeError(f"tensor {name!r} data must be bytes")
    torch_dtype, itemsize = DTYPES[dtype_name]
    expected = math.prod(shape) * itemsize
    if expected != len(data):
        raise DecodeError(
            f"tensor {name!r}: shape {shape} of {dtype_name} needs {expected} bytes, got {len(data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(data, dtype=torch_dtype)
    return flat.view(shape)


_M = TypeVar("_M", bound="Message")


@dataclass(frozen=True)
class Message:
    """Fields every message carries. ``(client_id, seq)`` names one batch for the whole run."""

    kind: ClassVar[Kind]
    _tensor_fields: ClassVar[tuple[str, ...]] = ()
    _optional_tensors: ClassVar[tuple[str, ...]] = ()

    job_id: str
    client_id: str
    seq: int
    model_version: int = 0
    created_at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        """Serialise to msgpack bytes (see docs/protocol.md)."""
        header: dict[str, Any] = {"schema": SCHEMA_VERSION, "kind": self.kind.value}
        tensors: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._tensor_fields:
                if value is not None:
                    tensors[f.name] = encode_tensor(value)
            elif f.name == "tensors":  # Weights.tensors
                tensors.update({k: encode_tensor(v) for k, v in value.items()})
            elif isinstance(value, Mapping):  # Hello.spec
                header[f.name] = dict(value)
            else:
                header[f.name] = value
        header["tensors"] = tensors
        return msgpack.packb(header, use_bin_type=True)

    def copy(self: _M, **changes: Any) -> _M:
        """A new message with some fields changed; messages are never mutated."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Forward(Message):
    """A batch of cut-layer activations travelling to the next segment.

    ``labels`` travel only in the vanilla configuration with labels at the data owner's
    side; ``sample_ids`` let a party holding labels (or other features) join by id.
    ``train`` is False for evaluation batches: no gradient comes back for those.
    """

    kind: ClassVar[Kind] = Kind.FORWARD
    _tensor_fields: ClassVar[tuple[str, ...]] = ("activations", "labels", "sample_ids")
    _optional_tensors: ClassVar[tuple[str, ...]] = ("labels", "sample_ids")

    activations: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    labels: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    train: bool = True


@dataclass(frozen=True)
class Backward(Message):
    """The gradient of the loss with respect to a Forward's activations.

    ``loss`` is the batch loss when the sender computed it (-1.0 when it did not);
    ``correct`` counts correct predictions, for eval batches and training accuracy.
    ``skipped`` says the batch was given up (a vertical party was missing): drop its stash.
    """

    kind: ClassVar[Kind] = Kind.BACKWARD
    _tensor_fields: ClassVar[tuple[str, ...]] = ("grad",)

    grad: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    loss: float = -1.0
    correct: int = -1
    skipped: bool = False


@dataclass(frozen=True)
class Weights(Message):
    """A segment's parameters, for hand-off or averaging between data owners."""

    kind: ClassVar[Kind] = Kind.WEIGHTS

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0


@dataclass(frozen=True)
class Hello(Message):
    """A party's agreed job spec (``JobConfig.agreed()``), sent when it joins.

    The peer answers with its own spec and, if they differ, ``error`` saying how.
    """

    kind: ClassVar[Kind] = Kind.HELLO

    spec: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""


AnyMessage = Union[Forward, Backward, Weights, Hello]
_BY_KIND: dict[str, type[Message]] = {cls.kind.value: cls for cls in (Forward, Backward, Weights, Hello)}
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "job_id": (str,), "client_id": (str,), "seq": (int,), "model_version": (int,),
    "created_at": (float, int), "train": (bool,), "loss": (float, int), "correct": (int,), "skipped": (bool,),
    "num_samples": (int,), "spec": (dict,), "error": (str,),
}
_SPEC_VALUE_TYPES = (str, int, float, bool)


def _plain(value: Any, depth: int) -> bool:
    """A scalar, or a list (nested at most ``depth`` deep) of scalars."""
    if isinstance(value, _SPEC_VALUE_TYPES):
        return True
    return depth > 0 and isinstance(value, list) and all(_plain(v, depth - 1) for v in value)


def decode(body: bytes | memoryview) -> AnyMessage:
    """Parse bytes from a peer into a message.

    Raises:
        DecodeError: on anything malformed: bad msgpack, unknown schema or kind, missing or
            mistyped fields, unknown fields, or tensors whose bytes do not match dtype and shape.
    """
    if len(body) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(body)} bytes exceeds the {MAX_MESSAGE_BYTES} cap")
    try:
        obj = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types for garbage; all mean the same here
        raise DecodeError(f"not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError("message must be a msgpack map")
    if obj.get("schema") != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema {obj.get('schema')!r}; this side speaks {SCHEMA_VERSION}")
    cls = _BY_KIND.get(obj["kind"]) if isinstance(obj.get("kind"), str) else None
    if cls is None:
        raise DecodeError(f"unknown message kind {obj.get('kind')!r}")
    return _build(cls, obj)  # type: ignore[return-value]


def _build(cls: type[Message], obj: dict[str, Any]) -> Message:
    tensors = obj.get("tensors")
    if not isinstance(tensors, dict):
        raise DecodeError("field 'tensors' must be a map")
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in obj.items():
        if key in ("schema", "kind", "tensors"):
            continue
        if key not in names or key in cls._tensor_fields or key == "tensors":
            raise DecodeError(f"unknown field {key!r} for {cls.kind.value}")
        allowed = _SCALAR_TYPES[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise DecodeError(f"field {key!r} has type {type(value).__name__}")
        kwargs[key] = float(value) if float in allowed else value
    if "spec" in kwargs and not all(isinstance(k, str) and _plain(v, 2) for k, v in kwargs["spec"].items()):
        raise DecodeError("field 'spec' must map names to scalars or (nested) lists of scalars")
    for required in ("job_id", "client_id", "seq"):
        if required not in kwargs:
            raise DecodeError(f"missing field {required!r}")
    if cls is Weights:
        kwargs["tensors"] = {str(k): decode_tensor(v, str(k)) for k, v in tensors.items()}
    else:
        for key in tensors:
            if key not in cls._tensor_fields:
                raise DecodeError(f"unknown tensor {key!r} for {cls.kind.value}")
        for name in cls._tensor_fields:
            if name in tensors:
                kwargs[name] = decode_tensor(tensors[name], name)
            elif name not in cls._optional_tensors:
                raise DecodeError(f"missing tensor {name!r}")
    return cls(**kwargs)
