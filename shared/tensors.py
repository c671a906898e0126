"""Tensors on the wire: which dtypes may travel, and a tensor as ``{"dtype", "shape", "data"}``.

The layout (little-endian raw bytes, no pickle) is specified in ``docs/protocol.md``; every
message of ``shared.wire`` carries its tensors this way. Decoding shares the message's bytes
instead of copying them.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Mapping

import torch

from splitmq.shared import packing
from splitmq.shared.errors import DecodeError

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
    "int16": (torch.int16, 2),
    "int8": (torch.int8, 1),
    "uint8": (torch.uint8, 1),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
# Decoded tensors are views of the message's immutable bytes; torch warns that it cannot mark
# them read-only. Filtered once here (a per-call catch_warnings costs more than the decode).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def encode_tensor(t: torch.Tensor) -> packing.Prepacked:
    """Lay a tensor out as ``{"dtype", "shape", "data"}`` without an extra copy when contiguous.

    The map is a ``packing.Prepacked``: its msgpack bytes before the data, the same for every
    tensor of a dtype and shape, are made once (``_head``), so encoding a message costs a
    few calls per tensor, not one per item.
    """
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"dtype {t.dtype} cannot travel; allowed: {sorted(DTYPES)}")
    if not t.is_contiguous():
        t = t.contiguous()
    shape = tuple(t.shape)
    if not t.numel():
        data: bytes | memoryview = b""
    elif t.dtype is torch.bfloat16:  # numpy has no bfloat16: its bytes as uint8
        data = t.reshape(-1).view(torch.uint8).numpy().data
    else:
        data = t.numpy().data.cast("B")
    return packing.Prepacked({"dtype": name, "shape": list(shape), "data": data}, _head(name, shape))


@functools.lru_cache(maxsize=1024)
def _head(dtype_name: str, shape: tuple[int, ...]) -> bytes:
    """The msgpack bytes of a tensor's map before its data (one per dtype and shape a job sends)."""
    nbytes = math.prod(shape) * DTYPES[dtype_name][1]
    return packing.map_head({"dtype": dtype_name, "shape": list(shape)}, "data", nbytes)


def decode_tensor(obj: Any, name: str, max_bytes: int) -> torch.Tensor:
    """Rebuild a tensor from its wire form, sharing the message's buffer (treat it read-only)."""
    if type(obj) is not dict or len(obj) != 3 or "dtype" not in obj or "shape" not in obj or "data" not in obj:
        raise DecodeError(f"tensor {name!r} must be a map of exactly dtype, shape, data")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    spec = DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if spec is None:
        raise DecodeError(f"tensor {name!r} has dtype {dtype_name!r}; allowed: {sorted(DTYPES)}")
    numel = _numel(shape, name, max_bytes)
    if type(data) is not bytes:
        raise DecodeError(f"tensor {name!r} data must be bytes")
    torch_dtype, itemsize = spec
    expected = numel * itemsize
    if expected != len(data):
        raise DecodeError(
            f"tensor {name!r}: shape {shape} of {dtype_name} needs {expected} bytes, got {len(data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(data, dtype=torch_dtype)
    if len(shape) == 1:
        return flat
    return flat.view(*shape) if shape else flat.view(())  # a scalar's shape is []; view() alone is refused


def _numel(shape: Any, name: str, max_bytes: int) -> int:
    """The number of elements of a valid wire shape: a list of at most ``MAX_NDIM`` sizes, each an
    int in ``[0, max_bytes]``, whose product with each 0 counted as 1 is at most ``max_bytes`` (torch
    overflows on such shapes even at numel 0)."""
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise DecodeError(f"tensor {name!r} has an invalid shape {shape!r}")
    numel = bound = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= max_bytes:
            raise DecodeError(f"tensor {name!r} has an invalid shape {shape!r}")
        numel, bound = numel * d, bound * (d or 1)
    if bound > max_bytes:
        raise DecodeError(f"tensor {name!r} has an invalid shape {shape!r}")
    return numel
