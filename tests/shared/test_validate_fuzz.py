"""Property-based fuzzing of the trainer's gate: workers/gate.py (size, decode, envelope), then
shared.validate's forward checks, exactly as the top role runs them.

Whatever bytes a hostile client publishes, the trainer sees one of two outcomes: a typed
rejection (DecodeError from the decoder, RejectedMessage from the validator, with a reason
from the fixed metric label set), or a message that satisfies every limit. Never another
exception, and never memory proportional to a size the sender merely declared.
"""
from __future__ import annotations

import math
import resource
from typing import Any

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitmq.shared import tensors, validate, wire
from splitmq.shared.errors import DecodeError, RejectedMessage
from splitmq.shared.metrics import REJECT_REASONS
from splitmq.shared.transport import Delivery
from splitmq.workers import gate as party_gate
from splitmq.workers.roles.base import Inbound, Source

LIMITS = validate.Limits(job_id="fuzzjob", cut_shape=(4,), max_batch=8)
INBOUND = Inbound("q", Source.FORWARD, frozenset({wire.Kind.FORWARD}), LIMITS.max_body_bytes())
RULES = party_gate.GateRules(job_id="fuzzjob")
FUZZ = settings(max_examples=800, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: Peak resident memory may grow this much over all the fuzzing (a single float32 tensor
#: of a declared 2**40 elements would need 4 TiB).
MAX_RSS_GROWTH_KIB = 256 * 1024


def valid_forward_bytes(batch: int = 3) -> bytes:
    """A forward message the gate accepts (for batch sizes within the limit). Deterministic."""
    return wire.Forward(job_id=LIMITS.job_id, client_id="client-0", seq=1,
                        activations=torch.linspace(-1, 1, batch * 4).view(batch, *LIMITS.cut_shape),
                        labels=torch.zeros(batch, dtype=torch.int64),
                        sample_ids=torch.arange(batch)).encode()


# ---- strategies ------------------------------------------------------------------------

huge_ints = st.sampled_from([2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63)])
any_int = st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), huge_ints)
scalars = st.one_of(
    st.none(), st.booleans(), any_int, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=24),
)
msgpack_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=4,
)
#: Well-formed tensors of other dtypes and shapes (and NaN/Inf-free zeros): they pass the
#: decoder, so only the validator stands between them and the model.
well_formed_tensors = st.builds(
    lambda dtype, shape: tensors.encode_tensor(torch.zeros(shape).to(dtype)),
    st.sampled_from([d for d, _ in tensors.DTYPES.values()]),
    st.lists(st.integers(0, 10), max_size=3),
)
#: What a mutation puts into each field: something plausible for that field (which reaches the
#: validator) or, as often, any msgpack value at all (which exercises the decoder).
_PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "schema": st.sampled_from([wire.SCHEMA_VERSION, 0, 2]),
    "kind": st.sampled_from([k.value for k in wire.Kind] + ["launch"]),
    "job_id": st.sampled_from(["otherjob", LIMITS.job_id, ""]),
    "client_id": st.sampled_from(["a.b", "#", "", "client-0.top", "x" * 65]),
    "seq": st.one_of(any_int, st.just(-1)),
    "model_version": st.one_of(any_int, st.just(-1)),
    "created_at": st.floats(allow_nan=True, allow_infinity=True),
    "train": st.booleans(),
    "loss": st.floats(allow_nan=True, allow_infinity=True),
    "dtype": st.sampled_from(sorted(tensors.DTYPES) + ["complex64", "object"]),
    "shape": st.lists(st.one_of(st.integers(0, 9), huge_ints), max_size=10),
    "data": st.binary(max_size=64),
    "tensor": well_formed_tensors,
}
#: Where a mutation lands: a top-level field, or a field of one tensor.
TARGETS = [
    ("schema",), ("kind",), ("job_id",), ("client_id",), ("seq",), ("model_version",), ("created_at",),
    ("train",), ("loss",), ("bogus",), ("tensors",), ("tensors", "bogus"), ("tensors", "grad"),
    ("tensors", "activations"), ("tensors", "labels"), ("tensors", "sample_ids"),
    *[("tensors", t, f) for t in ("activations", "labels", "sample_ids") for f in ("dtype", "shape", "data")],
]


def replacement_for(path: tuple[str, ...]) -> st.SearchStrategy[Any]:
    key = "tensor" if len(path) == 2 else path[-1]
    plausible = _PLAUSIBLE.get(key)
    return msgpack_values if plausible is None else st.one_of(plausible, msgpack_values)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid forward envelope with up to two fields replaced or removed.

    Mutating a valid message reaches the deep checks far more often than random maps do, and
    needs few draws, which keeps thousands of cases fast.
    """
    batch = draw(st.integers(0, LIMITS.max_batch + 2))
    obj: dict[str, Any] = msgpack.unpackb(valid_forward_bytes(batch), raw=False)
    for path in draw(st.lists(st.sampled_from(TARGETS), max_size=2)):
        parent: Any = obj
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if draw(st.integers(0, 4)) == 0:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(replacement_for(path))
    return obj


# ---- the property ----------------------------------------------------------------------

def gate(body: bytes) -> str:
    """Run the trainer's gate; return "accepted" or the rejection's reason. Anything else escapes."""
    try:
        inc = party_gate.admit(Delivery("q", body, 1, 0, False, "m", "c", "client-0", None, {}, "x", "client-0.top"),
                               INBOUND, RULES)
        msg = inc.msg
        assert isinstance(msg, wire.Forward)
        validate.check_forward(msg, LIMITS)
    except RejectedMessage as exc:
        assert exc.reason in REJECT_REASONS, exc.reason
        return exc.reason
    a = msg.activations  # an accepted message meets every limit
    assert a.dtype in LIMITS.dtypes and tuple(a.shape[1:]) == LIMITS.cut_shape
    assert 1 <= a.shape[0] <= LIMITS.max_batch and bool(torch.isfinite(a).all())
    assert msg.job_id == LIMITS.job_id and msg.seq >= 0
    return "accepted"


def decode_only(body: bytes) -> None:
    """The decoder alone (workers use it for gradients): a message or DecodeError, nothing else."""
    try:
        wire.decode(body)
    except DecodeError:
        pass


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_arbitrary_bytes_are_rejected_with_a_typed_reason_or_decoded_cleanly() -> None:
    # Given any bytes at all
    start = peak_rss_kib()

    @FUZZ
    @given(st.binary(max_size=256))
    def check(body: bytes) -> None:
        # When the decoder and the gate see them, Then only typed outcomes come out
        decode_only(body)
        gate(body)

    check()
    assert peak_rss_kib() - start < MAX_RSS_GROWTH_KIB


def test_arbitrary_msgpack_values_are_rejected_with_a_typed_reason() -> None:
    # Given any msgpack value, including maps, NaN, huge integers and nested junk
    @FUZZ
    @given(msgpack_values)
    def check(value: Any) -> None:
        body = msgpack.packb(value, use_bin_type=True)
        # When it is gated, Then it is rejected (no bare value is a valid envelope)
        decode_only(body)
        assert gate(body) != "accepted"

    check()


def test_near_valid_envelopes_never_escape_the_gate_or_allocate_declared_sizes() -> None:
    # Given envelopes with wrong types, wrong shapes, huge declared sizes and NaN/Inf floats
    start = peak_rss_kib()
    outcomes: set[str] = set()

    @settings(FUZZ, max_examples=2000)
    @given(envelopes())
    def check(obj: dict[str, Any]) -> None:
        body = msgpack.packb(obj, use_bin_type=True)
        # When gated, Then each gives a typed outcome
        decode_only(body)
        outcomes.add(gate(body))

    check()
    # Then memory did not follow the declared sizes, and the fuzzing reached deep checks
    assert peak_rss_kib() - start < MAX_RSS_GROWTH_KIB
    assert {"decode", "schema", "kind", "job", "dtype", "shape", "batch_size", "sequence", "identity",
            "accepted"} <= outcomes, outcomes


def test_truncated_and_bit_flipped_valid_messages_are_typed_outcomes() -> None:
    # Given a valid forward message's bytes
    body = valid_forward_bytes()
    assert gate(body) == "accepted"

    @FUZZ
    @given(st.integers(0, len(body) - 1), st.integers(0, len(body) - 1), st.integers(1, 255))
    def check(cut: int, pos: int, flip: int) -> None:
        # When it is truncated, or one byte is flipped
        truncated = body[:cut]
        flipped = bytearray(body)
        flipped[pos] ^= flip
        # Then truncation is always rejected, and a flip is rejected or still meets every limit
        assert gate(truncated) != "accepted"
        gate(bytes(flipped))
        decode_only(bytes(flipped))

    check()


def test_non_finite_activations_are_always_rejected() -> None:
    # Given activations with at least one NaN or Inf somewhere
    @FUZZ
    @given(st.integers(1, LIMITS.max_batch), st.data())
    def check(batch: int, data: st.DataObject) -> None:
        activations = torch.full((batch, 4), data.draw(st.floats(width=32, allow_nan=False, allow_infinity=False)))
        activations.view(-1)[data.draw(st.integers(0, batch * 4 - 1))] = data.draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))
        body = wire.Forward(job_id=LIMITS.job_id, client_id="client-0", seq=0, activations=activations).encode()
        # When gated, Then it is rejected as non-finite
        assert gate(body) == "non_finite"

    check()


def test_any_forward_message_passes_check_forward_only_if_it_meets_the_limits() -> None:
    # Given forward messages of any dtype, shape, ids and values that encode cleanly
    dtypes = st.sampled_from([d for d, _ in tensors.DTYPES.values()])

    @FUZZ
    @given(dtypes, st.lists(st.integers(0, 9), min_size=0, max_size=3), st.text(max_size=6),
           st.integers(-5, 2**63 - 1), st.data())
    def check(dtype: torch.dtype, shape: list[int], client: str, seq: int, data: st.DataObject) -> None:
        activations = torch.zeros(shape).to(dtype)
        if activations.numel() and dtype.is_floating_point:
            activations.view(-1)[0] = data.draw(st.floats(allow_nan=True, allow_infinity=True, width=16))
        msg = wire.Forward(job_id=LIMITS.job_id, client_id=client, seq=seq, activations=activations)
        # When it is sent and gated, Then the gate's verdict is typed and accepted ones are sound
        outcome = gate(msg.encode())
        if outcome == "accepted":
            assert tuple(shape[1:]) == LIMITS.cut_shape and dtype == torch.float32

    check()
