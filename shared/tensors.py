"""Tensors on the wire: which dtypes may travel, and a tensor as ``{"dtype", "shape", "data"}``.

The layout (little-endian raw bytes, no pickle) is specified in ``docs/protocol.md``; every
message of ``shared.wire`` carries its tensors this way. Decoding shares the message's bytes
instead of copying them.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import torch

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


def decode_tensor(obj: Any, name: str, max_bytes: int) -> torch.Tensor:
    """Rebuild a tensor from its wire form, sharing the message's buffer (treat it read-only)."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise DecodeError(f"tensor {name!r} must be a map of exactly dtype, shape, data")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise DecodeError(f"tensor {name!r} has dtype {dtype_name!r}; allowed: {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
        type(d) is int and 0 <= d <= max_bytes for d in shape
    ) or math.prod(max(d, 1) for d in shape) > max_bytes:  # torch overflows even at numel 0
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
