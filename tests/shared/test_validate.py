"""Each rejection reason of the gate (workers/gate.py) and of shared.validate, one plain example apiece."""
from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
import torch

from splitmq.shared import validate, wire
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.metrics import REJECT_REASONS
from splitmq.shared.transport import Delivery
from splitmq.workers import gate
from splitmq.workers.roles.base import Inbound, Source

LIMITS = validate.Limits(job_id="job1", cut_shape=(4,), max_batch=8)
INBOUND = Inbound("q", Source.FORWARD, frozenset({wire.Kind.FORWARD, wire.Kind.HELLO}), LIMITS.max_body_bytes())
RULES = gate.GateRules(job_id="job1")


def forward(**changes: Any) -> wire.Forward:
    fields: dict[str, Any] = dict(job_id="job1", client_id="client-0", seq=3,
                                  activations=torch.ones(2, 4), labels=torch.tensor([0, 1]))
    fields.update(changes)
    return wire.Forward(**fields)


def delivery(body: bytes, *, routing_key: str = "client-0.top", reply_to: str | None = "client-0",
             user_id: str | None = None) -> Delivery:
    return Delivery("q", body, 1, 0, False, "m", "client-0:3", reply_to, user_id, {}, "ex", routing_key)


def reason_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(RejectedMessage) as info:
        fn(*args, **kwargs)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


def test_a_well_formed_forward_message_passes_the_gate_and_the_checks() -> None:
    # Given a forward message within the limits, When admitted and checked, Then it comes back intact
    inc = gate.admit(delivery(forward().encode()), INBOUND, RULES)
    assert isinstance(inc.msg, wire.Forward) and inc.sender == "client-0"
    validate.check_forward(inc.msg, LIMITS)
    assert torch.equal(inc.msg.activations, torch.ones(2, 4))


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


def test_huge_finite_values_whose_sum_overflows_are_still_accepted() -> None:
    # Given finite values whose float32 sum is inf (the sum-first check must fall back)
    big = forward(activations=torch.full((2, 4), 3e38))
    # When checked, Then they pass: every value is finite
    validate.check_forward(big, LIMITS)


def test_a_body_bigger_than_any_valid_batch_is_refused_before_decoding() -> None:
    # Given a body far beyond the stage's largest batch (not even msgpack)
    body = b"\x00" * (LIMITS.max_body_bytes() + 1)
    # When it reaches the gate, Then it is refused for its size
    assert reason_of(gate.admit, delivery(body), INBOUND, RULES) == "size"


@pytest.mark.parametrize("reason, body", [
    ("decode", b"\xc1not msgpack"),
    ("decode", msgpack.packb([1, 2, 3])),
    ("schema", msgpack.packb({"schema": 99, "kind": "forward"})),
    ("kind", msgpack.packb({"schema": wire.SCHEMA_VERSION, "kind": "launch-missiles"})),
    ("kind", wire.Backward(job_id="job1", client_id="client-0", seq=1, grad=torch.ones(2, 4)).encode()),
])
def test_bodies_that_are_not_messages_this_queue_takes_are_rejected_with_a_reason(reason: str, body: bytes) -> None:
    assert reason_of(gate.admit, delivery(body), INBOUND, RULES) == reason


@pytest.mark.parametrize("reason, grad", [
    ("dtype", torch.ones(2, 4, dtype=torch.float16)),
    ("shape", torch.ones(4, 2)),
    ("shape", None),
    ("non_finite", torch.full((2, 4), math.nan)),
])
def test_check_gradient_rejects_gradients_that_do_not_match_what_was_sent(reason: str, grad: torch.Tensor) -> None:
    # Given a gradient for activations of shape (2, 4) with one thing wrong, Then the reason names it
    assert reason_of(validate.check_gradient, grad, (2, 4)) == reason


def test_a_message_routed_as_one_client_but_naming_another_is_rejected() -> None:
    # Given a message routed under client-1's key that claims to be client-0's
    body = forward().encode()
    assert reason_of(gate.admit, delivery(body, routing_key="client-1.top", reply_to="client-1"), INBOUND,
                     RULES) == "identity"
    # And one that asks for replies to be routed to someone else
    assert reason_of(gate.admit, delivery(body, reply_to="client-1"), INBOUND, RULES) == "identity"
    # And one whose reply route would be a wildcard
    assert reason_of(gate.admit, delivery(body, reply_to="#"), INBOUND, RULES) == "identity"


def test_required_identity_trusts_only_the_broker_validated_user() -> None:
    rules = gate.GateRules(job_id="job1", require_identity=True)
    body = forward().encode()
    assert reason_of(gate.admit, delivery(body, user_id=None), INBOUND, rules) == "identity"
    assert reason_of(gate.admit, delivery(body, user_id="client-1"), INBOUND, rules) == "identity"
    gate.admit(delivery(body, user_id="client-0"), INBOUND, rules)
    gate.admit(delivery(body, user_id=None), INBOUND, RULES)  # not required: no user_id is fine


def test_a_middle_hop_upstream_may_send_on_behalf_of_owners_but_only_replying_to_itself() -> None:
    rules = gate.GateRules(job_id="job1", upstream=frozenset({"mid"}))
    body = forward().encode()
    inc = gate.admit(delivery(body, routing_key="mid.top", reply_to="mid"), INBOUND, rules)
    assert inc.sender == "mid" and inc.msg.client_id == "client-0"
    assert reason_of(gate.admit, delivery(body, routing_key="mid.top", reply_to="client-0"), INBOUND,
                     rules) == "identity"


def test_limits_reject_impossible_values_at_construction() -> None:
    with pytest.raises(ValueError):
        validate.Limits(job_id="job1", cut_shape=(4,), max_batch=0)
    with pytest.raises(ValueError):
        validate.Limits(job_id="job1", cut_shape=(0,), max_batch=4)
    with pytest.raises(ValueError):
        validate.Limits(job_id="a.b", cut_shape=(4,), max_batch=4)
