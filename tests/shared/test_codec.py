"""Compression at the cut (shared/codec.py): round-trip error bounds, per-row int8, what a receiver refuses."""
from __future__ import annotations

import pytest
import torch

from splitmq.shared import codec, wire
from splitmq.shared.config import Compression, JobConfig
from splitmq.shared.errors import RejectedMessage


def cut(*, activations: str = "none", gradients: str = "none") -> codec.CutCodec:
    spec = JobConfig(compress_activations=Compression(activations), compress_gradients=Compression(gradients))
    return codec.CutCodec.for_spec(spec.agreed())


def forward(acts: torch.Tensor, **changes: object) -> wire.Forward:
    return wire.Forward(job_id="j", client_id="client-0", seq=3, activations=acts,
                        labels=torch.zeros(acts.shape[0], dtype=torch.int64), **changes)  # type: ignore[arg-type]


def over_the_wire(c: codec.CutCodec, msg: wire.AnyMessage) -> wire.AnyMessage:
    return c.incoming(wire.decode(c.outgoing(msg).encode()))


def test_int8_rows_are_within_half_a_step_of_their_own_largest_value() -> None:
    # Given rows of very different magnitudes (a per-tensor scale would flatten the small ones to zero)
    torch.manual_seed(0)
    x = torch.randn(16, 640) * torch.logspace(-6, 3, 16).unsqueeze(1)  # (16, 640), row r ~ 10^(-6 + 9r/15)
    # When each row is quantised with its own scale and restored
    q, scale = codec.quantize_rows(x)
    back = codec.dequantize_rows(q, scale)
    # Then the payload is int8 of x's shape, one float32 scale per row
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (16,) and scale.dtype == torch.float32
    # And every value is within half a step (max |row| / 254) of the original, in every row
    bound = x.abs().amax(dim=1, keepdim=True) / (2 * codec.INT8_LEVELS)
    assert bool(((back - x).abs() <= bound * 1.0001).all())
    # And the row maxima survive exactly (they map to +-127)
    assert torch.allclose(back.abs().amax(dim=1), x.abs().amax(dim=1), rtol=1e-6)


def test_an_all_zero_row_stays_zero_and_keeps_its_neighbours_exact_scale() -> None:
    # Given a batch whose middle sample is all zeros and a 3-d sample shape
    x = torch.randn(3, 4, 5)
    x[1] = 0
    # When it is quantised and restored
    q, scale = codec.quantize_rows(x)
    back = codec.dequantize_rows(q, scale)
    # Then the zero row is exactly zero with a zero scale, and the shape is kept
    assert scale[1] == 0 and bool((back[1] == 0).all()) and back.shape == (3, 4, 5)


def test_a_nan_or_inf_in_a_row_gives_a_scale_the_receiver_refuses() -> None:
    # Given activations with an Inf in one sample, sent with int8 activations
    c = cut(activations="int8")
    acts = torch.ones(2, 4)
    acts[0, 1] = float("inf")
    # When the receiver decodes the message
    # Then it refuses it as non-finite instead of training on it
    with pytest.raises(RejectedMessage) as info:
        over_the_wire(c, forward(acts))
    assert info.value.reason == "non_finite"


@pytest.mark.parametrize("setting,dtype,relative", [("fp16", torch.float16, 2 ** -11), ("bf16", torch.bfloat16, 2 ** -8)])
def test_half_precision_round_trips_within_its_mantissa(setting: str, dtype: torch.dtype, relative: float) -> None:
    # Given gradients of the size a mean loss over a batch gives, sent as fp16 or bf16
    torch.manual_seed(1)
    grad = torch.randn(8, 640) * 1e-3
    c = cut(gradients=setting)
    answer = wire.Backward(job_id="j", client_id="client-0", seq=3, grad=grad)
    # When it goes over the wire
    sent = c.outgoing(answer)
    back = over_the_wire(c, answer)
    # Then it travelled in the half dtype and comes back float32 within the dtype's rounding
    assert isinstance(sent, wire.Backward) and sent.grad is not None and sent.grad.dtype == dtype
    assert isinstance(back, wire.Backward) and back.grad is not None and back.grad.dtype == torch.float32
    assert bool(((back.grad - grad).abs() <= grad.abs() * relative + 1e-7).all())


def test_int8_activations_take_about_a_quarter_of_the_bytes_and_the_role_sees_float32() -> None:
    # Given a 64x640 batch, as the MLP's owner sends it
    acts = torch.relu(torch.randn(64, 640))
    msg = forward(acts)
    c = cut(activations="int8")
    # When it is encoded for the wire and decoded by the receiver
    body = c.outgoing(msg).encode()
    back = c.incoming(wire.decode(body))
    # Then the body is under 0.27 of float32's, and the receiver's message is float32 without a scale
    assert len(body) < 0.27 * len(msg.encode())
    assert isinstance(back, wire.Forward) and back.activations.dtype == torch.float32 and back.activations_scale is None
    # And the count of training samples carried is the batch's
    assert codec.cut_samples(c.outgoing(msg)) == 64


def test_a_tensor_that_does_not_travel_as_the_job_agreed_is_refused_with_a_reason() -> None:
    # Given a receiver of a job with int8 activations and fp16 gradients
    c = cut(activations="int8", gradients="fp16")
    plain = forward(torch.ones(2, 4))
    # Then float32 activations (a peer that does not compress) are refused as the wrong dtype
    with pytest.raises(RejectedMessage) as info:
        c.incoming(plain)
    assert info.value.reason == "dtype"
    # And int8 activations with a scale of the wrong shape are refused as a shape problem
    with pytest.raises(RejectedMessage) as info:
        c.incoming(forward(torch.ones(2, 4, dtype=torch.int8), activations_scale=torch.ones(3)))
    assert info.value.reason == "shape"
    # And a gradient sent as bf16 where fp16 was agreed is refused as the wrong dtype
    with pytest.raises(RejectedMessage) as info:
        c.incoming(wire.Backward(job_id="j", client_id="client-0", seq=3, grad=torch.ones(2, 4, dtype=torch.bfloat16)))
    assert info.value.reason == "dtype"
    # And in a job without compression a stray scale is refused, while plain float32 passes untouched
    with pytest.raises(RejectedMessage):
        cut().incoming(forward(torch.ones(2, 4), activations_scale=torch.ones(2)))
    assert cut().incoming(plain) is plain


def test_answers_without_a_gradient_and_other_kinds_pass_through_unchanged() -> None:
    # Given a compressing job's codec and messages that carry no cut tensor
    c = cut(activations="int8", gradients="int8")
    duplicate = wire.Backward(job_id="j", client_id="client-0", seq=3, outcome=wire.Outcome.DUPLICATE.value)
    hello = wire.Hello(job_id="j", client_id="client-0", seq=0)
    # Then the codec hands them back as they are, both ways, and counts no samples
    for msg in (duplicate, hello):
        assert c.outgoing(msg) is msg and c.incoming(msg) is msg and codec.cut_samples(msg) == 0


def test_the_settings_are_part_of_the_agreed_spec_so_a_join_lists_a_mismatch() -> None:
    # Given two parties' specs that differ only in how gradients travel
    from splitmq.shared.config import differences
    mine = JobConfig(compress_gradients=Compression.FP16).agreed()
    theirs = JobConfig().agreed()
    # Then the difference is listed by name, and a spec without the keys (an older peer) means none
    assert differences(mine, theirs) == ["compress_gradients: here 'fp16', peer 'none'"]
    older = {k: v for k, v in theirs.items() if not k.startswith("compress_")}
    assert differences(theirs, older) == [] and not codec.CutCodec.for_spec(older).active


def test_topk_keeps_each_rows_largest_values_where_they_were_and_zero_elsewhere() -> None:
    # Given a batch of 3-d samples and top-k keeping a quarter of each sample's values
    torch.manual_seed(0)
    x = torch.randn(5, 4, 8)
    c = cut(activations="topk")
    c_quarter = codec.CutCodec(codec.TopK(0.25, feedback=False), codec.Plain())
    # When it travels (encoded, through msgpack, decoded)
    sent = c_quarter.outgoing(forward(x))
    back = c_quarter.incoming(wire.decode(sent.encode()))
    # Then the wire carries 8 of 32 values per row with increasing int16 positions and the row shape
    assert isinstance(sent, wire.Forward) and sent.activations.shape == (5, 8)
    assert sent.activations_index is not None and sent.activations_index.dtype == torch.int16
    assert bool((sent.activations_index[:, 1:] > sent.activations_index[:, :-1]).all())
    assert sent.activations_shape is not None and sent.activations_shape.tolist() == [4, 8]
    # And the decoded tensor is float32 of x's shape: x's 8 largest magnitudes per row, zero elsewhere
    assert isinstance(back, wire.Forward) and back.activations.shape == x.shape and back.activations_index is None
    rows, got = x.reshape(5, -1), back.activations.reshape(5, -1)
    kept = got != 0
    assert bool((kept.sum(dim=1) == 8).all()) and torch.equal(got[kept], rows[kept])
    assert bool((rows.abs()[kept].reshape(5, 8).amin(dim=1) >= rows.abs().masked_fill(kept, 0).amax(dim=1)).all())
    # And the job's default (10%) sends ceil(0.1 x 32) = 4 values a row
    assert c.outgoing(forward(x)).activations.shape == (5, 4)  # type: ignore[attr-defined]
    # And a row too long for int16 positions gets int32 ones
    wide = c.outgoing(forward(torch.randn(2, 40000)))
    assert isinstance(wide, wire.Forward) and wide.activations_index is not None
    assert wide.activations_index.dtype == torch.int32 and c.incoming(wire.decode(wide.encode())).activations.shape == (2, 40000)  # type: ignore[union-attr]


def test_topk_error_feedback_sends_what_it_left_out_the_next_time_the_sample_goes() -> None:
    # Given an owner sending the same two samples every epoch with top-k activations (10%, error feedback)
    torch.manual_seed(1)
    x = torch.randn(2, 50)
    ids = torch.tensor([7, 9])
    spec = JobConfig(compress_activations=Compression.TOPK, topk_feedback=True).agreed()
    c = codec.CutCodec.for_spec(spec)

    def send(seq: int, train: bool = True) -> torch.Tensor:
        msg = wire.Forward(job_id="j", client_id="client-0", seq=seq, activations=x, sample_ids=ids, train=train)
        back = c.incoming(wire.decode(c.outgoing(msg).encode()))
        assert isinstance(back, wire.Forward)
        return back.activations

    first = send(0)
    # When the batch is sent again under the same seq (a re-send), and an evaluation batch goes between
    assert torch.equal(send(0), first)
    send(99, train=False)
    # Then over 40 epochs what arrives averages to the samples themselves (nothing is dropped for good),
    # though each send carries only 5 of 50 values a row
    total = first + sum(send(seq) for seq in range(1, 40))
    assert bool(((first != 0).sum(dim=1) == 5).all())
    assert torch.allclose(total / 40, x, atol=x.abs().max().item() / 10)
    # While without error feedback (the default) the same 5 values arrive every time
    plain = cut(activations="topk")
    once = plain.incoming(wire.decode(plain.outgoing(forward(x)).encode()))
    assert isinstance(once, wire.Forward) and not torch.allclose(once.activations, x, atol=x.abs().max().item() / 10)


@pytest.mark.parametrize("change, reason", [
    ({"activations_index": torch.tensor([[0, 40], [1, 2]], dtype=torch.int32)}, "shape"),   # past the row
    ({"activations_index": torch.tensor([[3, 1], [1, 2]], dtype=torch.int32)}, "shape"),    # not increasing
    ({"activations_index": torch.tensor([[1, 1], [1, 2]], dtype=torch.int32)}, "shape"),    # repeated
    ({"activations_index": torch.tensor([[0, 1], [1, 2]], dtype=torch.int64)}, "shape"),    # wrong dtype
    ({"activations_index": torch.tensor([[-1, 1], [1, 2]], dtype=torch.int16)}, "shape"),   # negative
    ({"activations_shape": None}, "shape"),                                                   # no row shape
    ({"activations_shape": torch.tensor([10**9], dtype=torch.int64)}, "shape"),               # a memory bomb
    ({"activations": torch.ones(2, 2, dtype=torch.float16)}, "dtype"),
    ({"activations_scale": torch.ones(2)}, "shape"),                                          # not this codec's
])
def test_topk_activations_that_do_not_travel_as_agreed_are_refused_with_a_reason(
        change: dict[str, object], reason: str) -> None:
    # Given a well-formed top-k forward (2 of 4 values per row)
    c = cut(activations="topk")
    good = wire.Forward(job_id="j", client_id="client-0", seq=3, activations=torch.ones(2, 2),
                        activations_index=torch.tensor([[0, 1], [1, 3]], dtype=torch.int32),
                        activations_shape=torch.tensor([4], dtype=torch.int64))
    assert c.incoming(good).activations.shape == (2, 4)  # type: ignore[union-attr]
    # When one part of it is malformed
    # Then the receiver refuses it with the reason a peer is told
    with pytest.raises(RejectedMessage) as info:
        c.incoming(good.copy(**change))
    assert info.value.reason == reason
