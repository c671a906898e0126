"""Each rejection reason of shared.validate, one plain example apiece."""
from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
import torch

from splitmq.shared import validate, wire
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.metrics import REJECT_REASONS

LIMITS = validate.Limits(job_id="job1", cut_shape=(4,), max_batch=8)


def forward(**changes: Any) -> wire.Forward:
    fields: dict[str, Any] = dict(job_id="job1", client_id="client-0", seq=3,
                                  activations=torch.ones(2, 4), labels=torch.tensor([0, 1]))
    fields.update(changes)
    return wire.Forward(**fields)


def reason_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(RejectedMessage) as info:
        fn(*args, **kwargs)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


def test_a_well_formed_forward_message_passes_the_gate() -> None:
    # Given a forward message within the limits, When it is parsed, Then it comes back intact
    msg = validate.parse_forward(forward().encode(), LIMITS)
    assert torch.equal(msg.activations, torch.ones(2, 4))


@pytest.mark.parametrize("reason, msg", [
    ("job", forward(job_id="otherjob")),
    ("dtype", forward(activations=torch.ones(2, 4, dtype=torch.float64))),
    ("shape", forward(activations=torch.ones(2, 5))),
    ("shape", forward(activations=torch.ones(2, 4, 1))),
    ("shape", forward(labels=torch.tensor([0, 1, 2]))),
    ("shape", forward(sample_ids=torch.tensor([0.0, 1.0]))),
    ("batch_size", forward(activations=torch.ones(0, 4), labels=None)),
    ("batch_size", forward(activations=torch.ones(9, 4), labels=None)),
    ("non_finite", forward(activations=torch.tensor([[1.0, math.nan, 0, 0]] * 2))),
    ("non_finite", forward(activations=torch.tensor([[1.0, -math.inf, 0, 0]] * 2))),
    ("non_finite", forward(created_at=math.inf)),
    ("sequence", forward(seq=-1)),
    ("sequence", forward(model_version=-1)),
    ("identity", forward(client_id="client-0.top")),
    ("identity", forward(client_id="#")),
])
def test_check_forward_rejects_each_bad_field_with_its_reason(reason: str, msg: wire.Forward) -> None:
    # Given a forward message with one bad field, When it is checked, Then the reason names it
    assert reason_of(validate.check_forward, msg, LIMITS) == reason


def test_a_body_bigger_than_any_valid_batch_is_refused_before_decoding() -> None:
    # Given a body far beyond the stage's largest batch (not even msgpack)
    body = b"\x00" * (LIMITS.max_body_bytes() + 1)
    # When it is parsed, Then it is refused for its size
    assert reason_of(validate.parse_forward, body, LIMITS) == "size"


@pytest.mark.parametrize("reason, body", [
    ("decode", b"\xc1not msgpack"),
    ("decode", msgpack.packb([1, 2, 3])),
    ("schema", msgpack.packb({"schema": 99, "kind": "forward"})),
    ("kind", msgpack.packb({"schema": wire.SCHEMA_VERSION, "kind": "launch-missiles"})),
    ("kind", wire.Backward(job_id="job1", client_id="client-0", seq=1, grad=torch.ones(2, 4)).encode()),
])
def test_bodies_that_are_not_forward_messages_are_rejected_with_a_decode_reason(reason: str, body: bytes) -> None:
    # Given bytes that are not a forward message, When parsed, Then the reason says why
    assert reason_of(validate.parse_forward, body, LIMITS) == reason


def test_labels_outside_the_classes_are_rejected() -> None:
    # Given labels with an index past the last class
    # When checked against 10 classes, Then they are rejected as a shape problem
    assert reason_of(validate.check_labels, torch.tensor([0, 10]), 10) == "shape"
    assert reason_of(validate.check_labels, torch.tensor([-1]), 10) == "shape"
    validate.check_labels(torch.tensor([0, 9]), 10)


@pytest.mark.parametrize("reason, grad, job", [
    ("job", torch.ones(2, 4), "otherjob"),
    ("dtype", torch.ones(2, 4, dtype=torch.float16), "job1"),
    ("shape", torch.ones(4, 2), "job1"),
    ("non_finite", torch.full((2, 4), math.nan), "job1"),
])
def test_check_backward_rejects_gradients_that_do_not_match_what_was_sent(
        reason: str, grad: torch.Tensor, job: str) -> None:
    # Given a gradient for activations of shape (2, 4) with one thing wrong
    msg = wire.Backward(job_id=job, client_id="client-0", seq=1, grad=grad)
    # When the worker checks it, Then the reason names the problem
    assert reason_of(validate.check_backward, msg, job_id="job1", shape=(2, 4)) == reason


def test_sequence_numbers_far_ahead_of_the_last_applied_one_are_rejected() -> None:
    # Given a client whose last applied batch was 10
    # When a batch claims a sequence far ahead (or negative), Then it is rejected
    assert reason_of(validate.check_sequence, 10 + validate.MAX_SEQ_JUMP + 1, 10) == "sequence"
    assert reason_of(validate.check_sequence, -1, 10) == "sequence"
    validate.check_sequence(11, 10)


def test_a_model_version_the_trainer_has_not_reached_is_rejected() -> None:
    # Given a trainer at model version 5, When a batch claims version 6, Then it is rejected
    assert reason_of(validate.check_model_version, 6, 5) == "sequence"
    validate.check_model_version(5, 5)


def test_a_message_without_a_broker_validated_user_id_is_rejected_when_identity_is_required() -> None:
    # Given a trainer that requires identity, When a message arrives without user_id
    # Then it is rejected for identity
    assert reason_of(validate.check_identity, None, "client-0", "client-0", require=True) == "identity"
    assert reason_of(validate.check_identity, "", "client-0", None, require=True) == "identity"


def test_a_user_posing_as_another_client_is_rejected() -> None:
    # Given a message from broker user client-1
    # When it claims to be client-0, or asks for replies to client-0, Then it is rejected
    assert reason_of(validate.check_identity, "client-1", "client-0", None, require=True) == "identity"
    assert reason_of(validate.check_identity, "client-1", "client-1", "client-0", require=True) == "identity"
    validate.check_identity("client-1", "client-1", "client-1", require=True)


def test_identity_is_not_checked_when_not_required() -> None:
    # Given a trainer without --require-identity, When a message has no user_id, Then it passes
    validate.check_identity(None, "client-0", None, require=False)


def test_reply_routes_that_are_not_client_names_are_rejected_even_without_required_identity() -> None:
    # Given a message whose reply_to or client id would be a wildcard routing key
    # When checked without required identity, Then it is still rejected before any reply is routed
    assert reason_of(validate.check_identity, None, "client-0", "#", require=False) == "identity"
    assert reason_of(validate.check_identity, None, "a.b", None, require=False) == "identity"


def test_limits_reject_impossible_values_at_construction() -> None:
    # Given nonsense limits, When constructed, Then ValueError straight away
    with pytest.raises(ValueError):
        validate.Limits(job_id="job1", cut_shape=(4,), max_batch=0)
    with pytest.raises(ValueError):
        validate.Limits(job_id="job1", cut_shape=(0,), max_batch=4)
    with pytest.raises(ValueError):
        validate.Limits(job_id="a.b", cut_shape=(4,), max_batch=4)
