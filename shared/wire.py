"""The one wire format: msgpack envelopes carrying tensors as dtype + shape + raw bytes.

Every message a peer sends is one of the frozen dataclasses below. ``encode()`` gives the
bytes to publish; ``decode(body)`` turns bytes back into the right dataclass or raises
``DecodeError``. No pickle: a peer's bytes are data, never code. The byte-level layout is
specified in ``docs/protocol.md``.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, TypeVar, Union, cast

import msgpack
import torch

from splitmq.shared import packing
from splitmq.shared.errors import DecodeError
from splitmq.shared.tensors import decode_tensor, encode_tensor

SCHEMA_VERSION = 2

#: Hard cap on one message's size; larger bodies are refused before unpacking.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Room for everything in an envelope but the tensor bytes (fields, tensor headers, spec maps).
ENVELOPE_BYTES = 64 * 1024

class Kind(str, Enum):
    """What a message is; the ``kind`` field on the wire."""

    FORWARD = "forward"    # activations going up the chain (or a batch to evaluate)
    BACKWARD = "backward"  # the answer to a forward: a gradient, a score, or why there is none
    WEIGHTS = "weights"    # a segment's parameters (hand-off or averaging between owners)
    HELLO = "hello"        # a party's job spec when it joins, and the peer's answer
    BYE = "bye"            # a data owner leaves the job (done, or giving up)
    ALIGN = "align"        # finding the sample ids vertical parties share (private set intersection)
    PREDICT = "predict"        # a forward-only inference request (or a vertical part request)
    PREDICTION = "prediction"  # its answer: the outputs, or why there are none
    EXPORT = "export"          # a request for a holder's trained segment (granted only with its consent)
    SEGMENT = "segment"        # its answer: the segment's parameters, or why not
    BUNDLE = "bundle"          # several forwards (or their answers) in one message (``coalesce`` > 1)


class Outcome(str, Enum):
    """What became of a forward message; the ``outcome`` of its ``backward`` answer."""

    APPLIED = "applied"        # ``grad`` is the gradient of the batch's activations
    EVALUATED = "evaluated"    # an evaluation batch was scored; no gradient
    SKIPPED = "skipped"        # given up (a vertical party was missing): drop the stash
    DUPLICATE = "duplicate"    # applied before; its gradient was sent then and waits in your reply queue
    REFUSED = "refused"        # not applied and never will be: ``error`` says why
    REJOIN = "rejoin"          # the peer does not know you (it lost its state): send hello, then re-send


class Served(str, Enum):
    """What became of an inference request; the ``reason`` of its ``prediction`` answer."""

    OK = "ok"                    # ``outputs`` hold the prediction (or a vertical part)
    INVALID = "invalid"          # the request cannot be served as sent (shape, dtype, unknown sample id)
    EXPIRED = "expired"          # its deadline had passed when a stage took it up
    TIMEOUT = "timeout"          # a later stage or a vertical part did not answer before the deadline
    UNAVAILABLE = "unavailable"  # nobody serves the next stage (or a vertical party) now
    FAILED = "failed"            # the segment raised: a bug or a resource problem at that stage


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
        """Serialise to msgpack bytes (see docs/protocol.md), each tensor's bytes copied once."""
        return packing.packb(self.as_map(), binaries=_BINARY_FIELDS)

    def as_map(self) -> dict[str, Any]:
        """The msgpack map this message travels as (tensors' data as buffers of their own memory)."""
        header: dict[str, Any] = {"schema": SCHEMA_VERSION, "kind": self.kind.value}
        tensors: dict[str, Any] = {}
        for name in _FIELD_NAMES[type(self)]:
            value = getattr(self, name)
            if name in self._tensor_fields:
                if value is not None:
                    tensors[name] = encode_tensor(value)
            elif name == "tensors":  # Weights.tensors, Align.tensors
                tensors.update({k: encode_tensor(v) for k, v in value.items()})
            elif name in _MAP_FIELDS:  # spec, facts, metrics: Mappings by type (an ABC check costs more)
                header[name] = dict(value)
            else:
                header[name] = value
        header["tensors"] = tensors
        return header

    def copy(self: _M, **changes: Any) -> _M:
        """A new message with some fields changed; messages are never mutated."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Forward(Message):
    """A batch of cut-layer activations travelling to the next segment.

    ``labels`` travel only when the data owner holds the labels and the top computes the
    loss; ``sample_ids`` let a party holding labels (or other features) join by id.
    ``train`` is False for evaluation batches, whose ``seq`` is the batch's index within
    an evaluation pass of ``eval_batches`` batches; no gradient comes back for those.
    ``attempt`` counts re-sends of the same batch (0 for the first). ``activations_scale`` is
    set only on the wire of a job with ``compress_activations = int8``, ``activations_index`` and
    ``activations_shape`` only with ``topk`` (``shared.codec``).
    """

    kind: ClassVar[Kind] = Kind.FORWARD
    _tensor_fields: ClassVar[tuple[str, ...]] = ("activations", "labels", "sample_ids", "activations_scale",
                                                 "activations_index", "activations_shape")
    _optional_tensors: ClassVar[tuple[str, ...]] = ("labels", "sample_ids", "activations_scale",
                                                    "activations_index", "activations_shape")

    activations: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    labels: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    train: bool = True
    epoch: int = 0
    eval_batches: int = 0
    attempt: int = 0
    activations_scale: torch.Tensor | None = None
    activations_index: torch.Tensor | None = None
    activations_shape: torch.Tensor | None = None


@dataclass(frozen=True)
class Backward(Message):
    """The answer to a forward message: its gradient, its score, or why there is none.

    ``loss`` is the batch loss when the sender computed it and may share it (else None).
    ``metrics`` carries task metrics: a training batch's (e.g. ``correct``), or, in the
    answer that completes an evaluation pass, the pass's results (e.g. ``accuracy``).
    ``grad_scale`` is set only on the wire of a job with ``compress_gradients = int8``,
    ``grad_index`` and ``grad_shape`` only with ``topk``.
    """

    kind: ClassVar[Kind] = Kind.BACKWARD
    _tensor_fields: ClassVar[tuple[str, ...]] = ("grad", "grad_scale", "grad_index", "grad_shape")
    _optional_tensors: ClassVar[tuple[str, ...]] = ("grad", "grad_scale", "grad_index", "grad_shape")

    grad: torch.Tensor | None = None
    outcome: str = Outcome.APPLIED.value
    loss: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str = ""
    grad_scale: torch.Tensor | None = None
    grad_index: torch.Tensor | None = None
    grad_shape: torch.Tensor | None = None


@dataclass(frozen=True)
class Weights(Message):
    """A segment's parameters, for hand-off or averaging between data owners (``seq`` = epoch)."""

    kind: ClassVar[Kind] = Kind.WEIGHTS

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0


@dataclass(frozen=True)
class Hello(Message):
    """A party's agreed job spec and its own facts, sent when it joins; the peer answers in kind.

    ``spec`` must be equal on both sides (``JobConfig.agreed()`` and the model fingerprint);
    ``facts`` are the sender's own (its client index and data size; in an answer, how far
    the peer has applied this client's batches). ``error`` is non-empty when the peer refuses.
    """

    kind: ClassVar[Kind] = Kind.HELLO

    spec: Mapping[str, Any] = field(default_factory=dict)
    facts: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Bye(Message):
    """A data owner leaves the job: ``completed`` after its last epoch, else ``reason`` says why.

    ``seq`` is the number of training batches it applied.
    """

    kind: ClassVar[Kind] = Kind.BYE

    completed: bool = True
    reason: str = ""


@dataclass(frozen=True)
class Align(Message):
    """One step of finding the sample ids the parties of a vertical job share, without showing
    the others: ``phase`` is ``request`` / ``response`` (opaque PSI messages as uint8 tensors)
    or ``result`` (the shared ids, ``train_ids`` and ``test_ids``, chosen by the label holder)."""

    kind: ClassVar[Kind] = Kind.ALIGN

    phase: str = "request"
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Predict(Message):
    """A forward-only inference request: the requester's activations at a cut, passed up the chain.

    Nothing is stashed, applied or de-duplicated. ``request_id`` names the request end to end;
    ``deadline`` (Unix time) is when the requester stops waiting: a stage past it answers
    ``expired`` instead of computing. A vertical top asks each other party for its part of the
    same ``sample_ids`` with a request that has no ``inputs``.
    """

    kind: ClassVar[Kind] = Kind.PREDICT
    _tensor_fields: ClassVar[tuple[str, ...]] = ("inputs", "sample_ids")
    _optional_tensors: ClassVar[tuple[str, ...]] = ("inputs", "sample_ids")

    inputs: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    request_id: str = ""
    deadline: float = 0.0


@dataclass(frozen=True)
class Prediction(Message):
    """The answer to a ``predict``: ``outputs`` when ``reason`` is ``ok``, else ``error`` says why.

    Errors travel as data (nameko's RemoteError): ``reason`` is a ``Served`` value and
    ``error`` the human-readable detail.
    """

    kind: ClassVar[Kind] = Kind.PREDICTION
    _tensor_fields: ClassVar[tuple[str, ...]] = ("outputs",)
    _optional_tensors: ClassVar[tuple[str, ...]] = ("outputs",)

    outputs: torch.Tensor | None = None
    request_id: str = ""
    reason: str = Served.OK.value
    error: str = ""


@dataclass(frozen=True)
class Export(Message):
    """A request, from ``client_id``, for the holder's trained segment number ``segment`` (0 = bottom)."""

    kind: ClassVar[Kind] = Kind.EXPORT

    request_id: str = ""
    segment: int = 0


@dataclass(frozen=True)
class Segment(Message):
    """A holder's answer to ``export``: the segment's ``state_dict``, or ``error`` (e.g. not approved)."""

    kind: ClassVar[Kind] = Kind.SEGMENT

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    request_id: str = ""
    segment: int = 0
    error: str = ""


@dataclass(frozen=True)
class Bundle(Message):
    """Several batches' forwards, or their answers, travelling as one message (``coalesce`` > 1).

    ``parts`` are ``(correlation_id, body)`` pairs, each body a whole encoded ``forward`` or
    ``backward`` of its own ``seq``: the receiver handles them one by one, as if each had come alone.
    ``client_id`` is the owner of the batches, ``seq`` the first part's.
    """

    kind: ClassVar[Kind] = Kind.BUNDLE

    parts: tuple[tuple[str, bytes], ...] = ()


AnyMessage = Union[Forward, Backward, Weights, Hello, Bye, Align, Predict, Prediction, Export, Segment, Bundle]
_CLASSES: tuple[type[Message], ...] = (Forward, Backward, Weights, Hello, Bye, Align, Predict, Prediction, Export,
                                       Segment, Bundle)
_BY_KIND: dict[str, type[Message]] = {cls.kind.value: cls for cls in _CLASSES}
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _CLASSES}
_NONE = type(None)
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "job_id": (str,), "client_id": (str,), "seq": (int,), "model_version": (int,),
    "created_at": (float, int), "train": (bool,), "epoch": (int,), "eval_batches": (int,), "attempt": (int,),
    "outcome": (str,), "loss": (float, int, _NONE), "metrics": (dict,), "error": (str,),
    "num_samples": (int,), "spec": (dict,), "facts": (dict,), "completed": (bool,), "reason": (str,),
    "phase": (str,),
    "request_id": (str,), "deadline": (float, int), "segment": (int,), "parts": (list,),
}
_MAP_FIELDS = ("spec", "facts", "metrics")
#: Where a message's large binaries lie: its tensors' data, a bundle's encoded parts.
_BINARY_FIELDS = frozenset({"tensors", "parts"})
_SPEC_VALUE_TYPES = (str, int, float, bool)
_OUTCOMES = frozenset(o.value for o in Outcome)
_SERVED = frozenset(o.value for o in Served)


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


def _scalars(cls: type[Message], obj: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    names = _FIELD_NAMES[cls]
    for key, value in obj.items():
        if key in ("schema", "kind", "tensors"):
            continue
        if key not in names or key in cls._tensor_fields or key == "tensors":
            raise DecodeError(f"unknown field {key!r} for {cls.kind.value}")
        allowed = _SCALAR_TYPES[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise DecodeError(f"field {key!r} has type {type(value).__name__}")
        kwargs[key] = float(cast(float, value)) if float in allowed and value is not None else value
    for key in _MAP_FIELDS:
        if key in kwargs and not all(isinstance(k, str) and _plain(v, 3) for k, v in kwargs[key].items()):
            raise DecodeError(f"field {key!r} must map names to scalars or (nested) lists of scalars")
    if "metrics" in kwargs and not all(type(v) in (int, float) for v in kwargs["metrics"].values()):
        raise DecodeError("field 'metrics' must map names to numbers")
    if cls is Prediction and kwargs.get("reason", Served.OK.value) not in _SERVED:
        raise DecodeError(f"field 'reason' is {kwargs['reason']!r}; allowed: {sorted(_SERVED)}")
    if "outcome" in kwargs and kwargs["outcome"] not in _OUTCOMES:
        raise DecodeError(f"field 'outcome' is {kwargs['outcome']!r}; allowed: {sorted(_OUTCOMES)}")
    if "parts" in kwargs:
        kwargs["parts"] = _parts(kwargs["parts"])
    for required in ("job_id", "client_id", "seq"):
        if required not in kwargs:
            raise DecodeError(f"missing field {required!r}")
    return kwargs


def _parts(value: list[Any]) -> tuple[tuple[str, bytes], ...]:
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], bytes)
               for p in value):
        raise DecodeError("field 'parts' must list [correlation_id, body] pairs (a string and bytes)")
    return tuple((p[0], p[1]) for p in value)


def _build(cls: type[Message], obj: dict[str, Any]) -> Message:
    tensors = obj.get("tensors")
    if not isinstance(tensors, dict):
        raise DecodeError("field 'tensors' must be a map")
    kwargs = _scalars(cls, obj)
    if cls in (Weights, Align, Segment):
        kwargs["tensors"] = {str(k): decode_tensor(v, str(k), MAX_MESSAGE_BYTES) for k, v in tensors.items()}
    else:
        for key in tensors:
            if key not in cls._tensor_fields:
                raise DecodeError(f"unknown tensor {key!r} for {cls.kind.value}")
        for name in cls._tensor_fields:
            if name in tensors:
                kwargs[name] = decode_tensor(tensors[name], name, MAX_MESSAGE_BYTES)
            elif name not in cls._optional_tensors:
                raise DecodeError(f"missing tensor {name!r}")
    return cls(**kwargs)
