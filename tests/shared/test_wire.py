"""The wire format: round trips, and clear errors for what does not fit."""
from __future__ import annotations

import msgpack
import pytest
import torch

from splitmq.shared import tensors, wire
from splitmq.shared.errors import DecodeError


def test_a_forward_message_survives_encoding_bit_for_bit() -> None:
    # Given a forward message with activations, labels and sample ids
    msg = wire.Forward(job_id="j", client_id="c", seq=7, model_version=3, activations=torch.randn(64, 640),
                       labels=torch.arange(64), sample_ids=torch.arange(64) * 3, train=False)
    # When it is encoded and decoded
    back = wire.decode(msg.encode())
    # Then every field and tensor is equal, with dtype and shape kept
    assert isinstance(back, wire.Forward)
    assert (back.job_id, back.client_id, back.seq, back.model_version, back.train) == ("j", "c", 7, 3, False)
    assert torch.equal(back.activations, msg.activations) and back.activations.dtype == torch.float32
    assert torch.equal(back.labels, msg.labels) and torch.equal(back.sample_ids, msg.sample_ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8])
def test_every_allowed_dtype_round_trips(dtype: torch.dtype) -> None:
    t = (torch.rand(3, 5) * 100).to(dtype)
    back = wire.decode(wire.Weights(job_id="j", client_id="c", seq=0, tensors={"w": t}).encode())
    assert back.tensors["w"].dtype == dtype and torch.equal(back.tensors["w"], t)


def test_backward_hello_bye_and_copy_round_trip() -> None:
    grad = wire.Backward(job_id="j", client_id="c", seq=1, grad=torch.ones(2, 3), loss=0.25,
                         metrics={"accuracy": 0.5}, outcome=wire.Outcome.SKIPPED.value)
    back = wire.decode(grad.encode())
    assert isinstance(back, wire.Backward)
    assert (back.loss, dict(back.metrics), back.outcome) == (0.25, {"accuracy": 0.5}, "skipped")
    empty = wire.decode(wire.Backward(job_id="j", client_id="c", seq=1, outcome="refused", error="why").encode())
    assert isinstance(empty, wire.Backward) and empty.grad is None and empty.loss is None and empty.error == "why"
    hello = wire.Hello(job_id="j", client_id="c", seq=0, spec={"cuts": ["relu2"], "bottom_params": [["w", [3, 4]]]},
                       facts={"client_index": 0})
    back_hello = wire.decode(hello.encode())
    assert isinstance(back_hello, wire.Hello) and back_hello.spec == hello.spec and back_hello.facts == hello.facts
    bye = wire.decode(wire.Bye(job_id="j", client_id="c", seq=63, completed=False, reason="stopped").encode())
    assert isinstance(bye, wire.Bye) and (bye.seq, bye.completed, bye.reason) == (63, False, "stopped")
    assert grad.copy(seq=9).seq == 9 and grad.seq == 1  # copies, never mutates


def test_a_non_contiguous_tensor_is_sent_as_its_values() -> None:
    t = torch.arange(12.0).view(3, 4).t()
    back = wire.decode(wire.Backward(job_id="j", client_id="c", seq=0, grad=t).encode())
    assert torch.equal(back.grad, t)


def _body(**changes: object) -> bytes:
    obj = msgpack.unpackb(wire.Backward(job_id="j", client_id="c", seq=0, grad=torch.ones(2)).encode())
    obj.update(changes)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("body, words", [
    (b"\xc1", "not valid msgpack"),
    (msgpack.packb([1, 2]), "must be a msgpack map"),
    (_body(schema=1), "unsupported schema"),
    (_body(outcome="maybe"), "field 'outcome'"),
    (_body(metrics={"accuracy": "high"}), "field 'metrics'"),
    (_body(kind="pickle"), "unknown message kind"),
    (_body(seq="1"), "field 'seq'"),
    (_body(extra=1), "unknown field"),
    (_body(tensors={"grad": {"dtype": "float32", "shape": [3], "data": b"\0" * 8}}), "needs 12 bytes"),
    (_body(tensors={"grad": {"dtype": "object", "shape": [1], "data": b"\0"}}), "dtype"),
    (_body(tensors={"activations": {"dtype": "float32", "shape": [0], "data": b""}}), "unknown tensor"),
])
def test_malformed_bodies_raise_decode_error_saying_what_is_wrong(body: bytes, words: str) -> None:
    with pytest.raises(DecodeError, match=words):
        wire.decode(body)


def test_a_tensor_of_an_unsupported_dtype_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="cannot travel"):
        tensors.encode_tensor(torch.zeros(2, dtype=torch.complex64))


def test_serving_messages_round_trip_with_their_ids_deadlines_and_errors() -> None:
    # Given a prediction request, its answers (ok and an error), an export request and its segment answer
    ask = wire.Predict(job_id="j", client_id="client-0", seq=3, inputs=torch.randn(4, 640),
                       sample_ids=torch.arange(4), request_id="client-0:predict:3", deadline=1700000000.5)
    ok = wire.Prediction(job_id="j", client_id="client-0", seq=3, outputs=torch.randn(4, 10), request_id="r")
    late = wire.Prediction(job_id="j", client_id="client-0", seq=3, request_id="r",
                           reason=wire.Served.TIMEOUT.value, error="no part from client-1")
    export = wire.Export(job_id="j", client_id="client-0", seq=0, request_id="e", segment=1)
    segment = wire.Segment(job_id="j", client_id="top", seq=0, tensors={"fc3.weight": torch.ones(10, 640)},
                           request_id="e", segment=1, error="")
    # When each is encoded and decoded
    back = [wire.decode(m.encode()) for m in (ask, ok, late, export, segment)]
    # Then every field comes back, tensors bit for bit, and errors travel as data
    assert isinstance(back[0], wire.Predict) and back[0].request_id == ask.request_id
    assert back[0].deadline == ask.deadline and torch.equal(back[0].inputs, ask.inputs)
    assert isinstance(back[1], wire.Prediction) and back[1].reason == "ok" and torch.equal(back[1].outputs, ok.outputs)
    assert isinstance(back[2], wire.Prediction) and back[2].outputs is None and back[2].error == late.error
    assert isinstance(back[3], wire.Export) and (back[3].segment, back[3].request_id) == (1, "e")
    assert isinstance(back[4], wire.Segment) and torch.equal(back[4].tensors["fc3.weight"], torch.ones(10, 640))


def test_a_prediction_with_an_unknown_reason_is_refused_and_reasons_match_the_metric_labels() -> None:
    # Given a prediction whose reason is not one of the served outcomes
    obj = msgpack.unpackb(wire.Prediction(job_id="j", client_id="c", seq=0).encode())
    obj["reason"] = "maybe"
    # Then decoding refuses it, naming the field
    with pytest.raises(DecodeError, match="field 'reason'"):
        wire.decode(msgpack.packb(obj, use_bin_type=True))
    # And the reasons are exactly the outcomes the inference metrics are labelled with
    from splitmq.shared.metrics import INFERENCE_OUTCOMES
    assert tuple(r.value for r in wire.Served) == INFERENCE_OUTCOMES
