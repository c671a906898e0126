"""``shared.packing``: the same bytes as ``msgpack.packb``, large binaries copied once."""
from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
import torch

from splitmq.shared import packing, tensors, topology, wire
from tests.conformance.examples import EXAMPLES


def _large(msg: wire.Message) -> wire.Message:
    """``msg`` with every tensor grown past ``JOIN_AT_BYTES`` (so the joining path is the one taken)."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.repeat(400, *[1] * (value.dim() - 1)) if value.dim() else value
        elif f.name == "tensors":
            changes[f.name] = {k: v.repeat(400, *[1] * (v.dim() - 1)) for k, v in value.items()}
    return msg.copy(**changes)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_message_kind_encodes_to_the_bytes_msgpack_gives(name: str) -> None:
    # Given each example of the protocol page, as it is and with tensors past the joining threshold
    for msg in (EXAMPLES[name], _large(EXAMPLES[name])):
        # When it is encoded
        body = msg.encode()
        # Then the bytes are msgpack's own for the same map, and they decode to the same message
        assert body == msgpack.packb(msg.as_map(), use_bin_type=True)
        assert wire.decode(body).encode() == body


def test_a_bundle_of_full_sized_batches_is_msgpacks_bytes_and_its_parts_come_back_whole() -> None:
    # Given four forwards of the seed MLP's cut (64 x 640 float32, 160 KB each) in one bundle
    parts = tuple((topology.batch_id("client-0", s), wire.Forward(
        job_id="j", client_id="client-0", seq=s, activations=torch.randn(64, 640),
        labels=torch.randint(0, 10, (64,))).encode()) for s in range(4))
    bundle = wire.Bundle(job_id="j", client_id="client-0", seq=0, parts=parts)
    # When it is encoded
    body = bundle.encode()
    # Then it is msgpack's encoding, and each part decodes to its own forward
    assert body == msgpack.packb(bundle.as_map(), use_bin_type=True)
    decoded = wire.decode(body)
    assert isinstance(decoded, wire.Bundle) and decoded.parts == parts


@pytest.mark.parametrize("length", [0, 1, 255, 256, 1023, 1024, 65535, 65536, 70000])
def test_binary_headers_match_msgpacks_at_every_size_boundary(length: int) -> None:
    # Given a binary of a length on either side of msgpack's bin 8 / bin 16 / bin 32 boundaries
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    # When it is packed in a map, alone and as a buffer of non-byte items (a float32 tensor's memory)
    packed = packing.packb({"a": 1, "data": data, "z": "end"}, binaries={"data"})
    floats = memoryview(bytearray(data[: length - length % 4])).cast("f")
    packed_view = packing.packb({"data": floats}, binaries={"data"})
    # Then the bytes are msgpack's
    assert packed == msgpack.packb({"a": 1, "data": data, "z": "end"}, use_bin_type=True)
    assert packed_view == msgpack.packb({"data": floats.tobytes()}, use_bin_type=True)
    assert packing.bin_header(length) == msgpack.packb(data)[: len(packing.bin_header(length))]


def test_a_binary_of_four_gib_is_refused_saying_msgpacks_limit() -> None:
    with pytest.raises(ValueError, match="4 GiB"):
        packing.bin_header(1 << 32)


@pytest.mark.parametrize("tensor", [torch.tensor(3.0), torch.zeros(0, 3), torch.randn(3, 4).t(),
                                    torch.randn(2, 3, requires_grad=True) * 2, torch.randn(4).to(torch.bfloat16),
                                    torch.randn(64, 640).half(), torch.arange(5).to(torch.int8)],
                         ids=["scalar", "empty", "transposed", "requires-grad", "bfloat16", "float16", "int8"])
def test_a_tensors_map_is_written_as_its_cached_head_then_its_data(tensor: torch.Tensor) -> None:
    # Given a tensor of any dtype that travels, of any shape, contiguous or not
    # When it is laid out for the wire and packed
    laid = tensors.encode_tensor(tensor)
    packed = packing.packb({"t": laid}, binaries={"t"})
    # Then it is written in two pieces, its cached head and its data, to the bytes msgpack gives
    assert isinstance(laid, packing.Prepacked)
    assert msgpack.packb(dict(laid), use_bin_type=True) == laid.head + bytes(laid["data"])
    assert packed == msgpack.packb({"t": dict(laid)}, use_bin_type=True)
    # And it decodes to the tensor it was
    back = tensors.decode_tensor(msgpack.unpackb(packed)["t"], "t", 10**9)
    assert back.dtype == tensor.dtype and torch.equal(back, tensor.detach())
