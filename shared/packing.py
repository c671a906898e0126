"""msgpack bytes with one copy of each large binary, the same bytes ``msgpack.packb`` gives.

``msgpack.packb`` copies a tensor's bytes into its growing buffer (reallocating as it
grows) and then once more into the ``bytes`` it returns; a bundle of already-encoded
batches copies them twice again. A message of 160-660 KB is thus copied four to six times
on its way out, and the copies evict what the Stage is about to read. ``packb`` here
packs the plain items with msgpack, writes a binary's header by hand and joins the pieces
once: large binaries (tensor data, a bundle's parts) are copied exactly once, into the
body. The bytes are identical to ``msgpack.packb(obj, use_bin_type=True)``
(``tests/shared/test_packing.py`` checks it on every message kind).
"""
from __future__ import annotations

import struct
from collections.abc import Collection, Mapping
from typing import Any

import msgpack

#: Binaries at least this long are joined in place; shorter ones msgpack packs as it would.
JOIN_AT_BYTES = 1024

_BIN8, _BIN16, _BIN32 = b"\xc4", b"\xc5", b"\xc6"


def packb(obj: Mapping[str, Any], *, binaries: Collection[str]) -> bytes:
    """``obj`` as msgpack (``use_bin_type=True``), the large binaries under its keys ``binaries`` copied once.

    The other values go to msgpack as they are, consecutive ones in one call: walking a whole
    message in Python would cost more than the copies it saves.

    Raises:
        TypeError: a value msgpack cannot pack, or a binary that is not one contiguous buffer.
        ValueError: a binary of 4 GiB or more (msgpack's limit).
    """
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)  # one per call: threads share none
    out: list[bytes | memoryview] = [packer.pack_map_header(len(obj))]
    run: dict[str, Any] = {}  # consecutive plain items: one msgpack call, their map's header cut off
    for key, value in obj.items():
        if key not in binaries:
            run[key] = value
            continue
        if run:
            out.append(_map_items(packer, run))
            run = {}
        out.append(packer.pack(key))
        _walk(packer, value, out)
    if run:
        out.append(_map_items(packer, run))
    return b"".join(out)


class Prepacked(dict[str, Any]):
    """A map that carries its own msgpack bytes up to its last value, a binary (``head``, from ``map_head``).

    ``packb`` writes ``head`` and joins the binary after it instead of packing the map item by
    item: a tensor's map (``shared.tensors``) is written in two pieces, whatever its shape.
    It is a ``dict`` with the same items, so ``msgpack.packb`` packs it to the same bytes.
    """

    __slots__ = ("head",)

    def __init__(self, items: dict[str, Any], head: bytes) -> None:
        super().__init__(items)
        self.head = head


def map_head(items: Mapping[str, Any], last: str, nbytes: int) -> bytes:
    """The msgpack bytes of the map ``items`` + ``{last: <a binary of nbytes>}`` up to the binary's own bytes."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    header: bytes = packer.pack_map_header(len(items) + 1)
    key: bytes = packer.pack(last)
    return header + (_map_items(packer, dict(items)) if items else b"") + key + bin_header(nbytes)


def _walk(packer: msgpack.Packer, obj: Any, out: list[bytes | memoryview]) -> None:
    if type(obj) is Prepacked:
        out.append(obj.head)
        data = next(reversed(obj.values()))
        out.append(data if isinstance(data, bytes) else memoryview(data).cast("B"))
    elif isinstance(obj, (bytes, bytearray, memoryview)) and _nbytes(obj) >= JOIN_AT_BYTES:
        out.append(bin_header(_nbytes(obj)))
        out.append(obj if isinstance(obj, bytes) else memoryview(obj).cast("B"))
    elif type(obj) is dict or isinstance(obj, Mapping):  # an ABC check costs more than the test
        out.append(packer.pack_map_header(len(obj)))
        for key, value in obj.items():
            out.append(packer.pack(key))
            _walk(packer, value, out)
    elif isinstance(obj, (list, tuple)):
        out.append(packer.pack_array_header(len(obj)))
        for item in obj:
            _walk(packer, item, out)
    else:
        out.append(packer.pack(obj))


def _map_items(packer: msgpack.Packer, run: dict[str, Any]) -> bytes:
    """The packed items of ``run`` without their map's header (fixmap, map 16 or map 32)."""
    n = len(run)
    packed: bytes = packer.pack(run)
    return packed[1 if n < 16 else 3 if n < 1 << 16 else 5:]


def _nbytes(buf: bytes | bytearray | memoryview) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def bin_header(length: int) -> bytes:
    """msgpack's header of a binary of ``length`` bytes (bin 8, 16 or 32: the smallest that fits).

    Raises:
        ValueError: ``length`` of 4 GiB or more.
    """
    if length < 1 << 8:
        return _BIN8 + struct.pack(">B", length)
    if length < 1 << 16:
        return _BIN16 + struct.pack(">H", length)
    if length < 1 << 32:
        return _BIN32 + struct.pack(">I", length)
    raise ValueError(f"a binary of {length} bytes; msgpack carries at most 4 GiB - 1")
