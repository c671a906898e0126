"""What splitmq's parties compute, with no transport: the in-process references of ``splitmq bench cpu``.

* **Local training**: ``bench.local`` (the whole model in one process).
* **The bottom alone and the top alone**: the very Stages a worker and a trainer build
  (``workers.assemble``, the job's defaults), driven in a hot loop over the same batches: the
  bottom's forward, then its backward with a fixed gradient; the top's forward, loss, backward
  and step on fixed activations. The bottom runs twice: as at K=1 (no weight stash) and with
  ``in_flight`` batches outstanding, as the worker does at K>1 (weight stash, and the job's
  default staleness correction).
* **Validation of one real message** as the parties do it: the trainer's gate
  (``workers.gate.admit``) and ``shared.validate.check_forward`` on a Forward built as the bottom
  role builds it; the worker's gate and ``check_gradient`` on a Backward. The gate also decodes;
  validation is the gate's own checks (timed with its ``wire.decode`` handing back the decoded
  message) plus the role's check. The whole gate and ``wire.decode`` alone are timed too.
  Against a memcpy of the message body.

CPU is the calling thread's (``time.thread_time``, in ``common.timed_training``): with one torch
thread every loop runs on it.
"""
from __future__ import annotations

import collections
import timeit
import uuid
from unittest import mock
from typing import Any, Callable

import torch

from splitmq.bench import local
from splitmq.bench.common import BATCH_SIZE, dataset, set_threads, timed_training
from splitmq.shared import topology, validate, wire
from splitmq.shared.config import JobConfig
from splitmq.shared.transport import Delivery
from splitmq.workers import assemble, gate
from splitmq.workers.roles.base import Inbound, Source

#: Scale of the fixed gradient fed back to the bottom (small: the loop must not diverge to NaN).
_GRAD_SCALE = 1e-3
#: Seconds per timed validation function (each best of three; a call takes tens of µs).
VALIDATION_S = 1.0
CLIENT = topology.client_name(0)


def _config(model: str, in_flight: int, dataset_name: str) -> JobConfig:
    return JobConfig(model=model, num_clients=1, data=dataset_name, max_in_flight=in_flight)


def bottom(model: str, in_flight: int, seconds: float, dataset_name: str) -> dict[str, Any]:
    """The worker's Stage alone: forward each batch, backward the one ``in_flight`` batches back."""
    set_threads()
    train = dataset(dataset_name).train
    cfg = _config(model, in_flight, dataset_name)
    stage = assemble.bottom_stage(cfg, 0, len(train), "cpu")
    grad = _GRAD_SCALE * torch.randn(BATCH_SIZE, *_cut_shape(stage, train))  # (64, 640) for the MLP
    waiting: collections.deque[tuple[int, int]] = collections.deque()   # (key, rows) of batches out
    key = 0

    def step(x: torch.Tensor, _y: torch.Tensor) -> float:
        nonlocal key
        stage.forward(key, x)
        waiting.append((key, len(x)))
        key += 1
        if len(waiting) >= in_flight:
            done, rows = waiting.popleft()
            stage.backward(done, grad[:rows])
        return 0.0

    return {"in_flight": in_flight, "stash": stage.stash_weights, "correction": cfg.staleness.value,
            **timed_training(train, step, seconds=seconds)}


def top(model: str, seconds: float, dataset_name: str) -> dict[str, Any]:
    """The trainer's last Stage alone: forward, loss, backward and step on one batch's activations."""
    set_threads()
    cfg = _config(model, 1, dataset_name)
    train = dataset(dataset_name).train
    owner = assemble.bottom_stage(cfg, 0, len(train), "cpu")
    first = train.batch(torch.arange(BATCH_SIZE))
    assert first.x is not None
    acts = owner.infer(first.x)                                         # (64, 640) for the MLP
    stage = assemble.server_stage(cfg, 1, last=True, total_steps=lambda: 10**9, device="cpu")

    def step(_x: torch.Tensor, y: torch.Tensor) -> float:
        return stage.loss_step(acts[:len(y)], y).loss

    return timed_training(train, step, seconds=seconds)


def _cut_shape(stage: Any, train: Any) -> tuple[int, ...]:
    first = train.batch(torch.arange(2))
    return tuple(stage.infer(first.x).shape[1:])


def messages(model: str, dataset_name: str) -> tuple[wire.Forward, wire.Backward]:
    """One batch's Forward and Backward as the bottom and top roles build them (real activations,
    labels, sample ids): the job's message sizes."""
    set_threads()
    cfg = _config(model, 1, dataset_name)
    train = dataset(dataset_name).train
    batch = train.batch(torch.arange(BATCH_SIZE))
    assert batch.x is not None
    acts = assemble.bottom_stage(cfg, 0, len(train), "cpu").infer(batch.x)   # (64, 640) for the MLP
    job = "bench" + uuid.uuid4().hex[:10]
    fwd = wire.Forward(job_id=job, client_id=CLIENT, seq=7, model_version=7, activations=acts, labels=batch.y,
                       sample_ids=batch.ids, epoch=0)
    bwd = wire.Backward(job_id=job, client_id=CLIENT, seq=7, model_version=7, grad=_GRAD_SCALE * torch.randn_like(acts),
                        loss=2.3)
    return fwd, bwd


def per_call(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call of ``fn``: the best of three timings of about ``seconds`` / 3 each."""
    took = timeit.timeit(fn, number=10) / 10   # a first guess of one call, to size the timings
    number = max(1, int(seconds / 3 / max(took, 1e-9)))
    return min(timeit.repeat(fn, number=number, repeat=3)) / number


def validation(model: str, seconds: float, dataset_name: str) -> dict[str, Any]:
    """µs per message of each party's gate and checks on a real message, and of a memcpy of it."""
    set_threads()
    fwd, bwd = messages(model, dataset_name)
    job = fwd.job_id
    rules = gate.GateRules(job_id=job)
    limits = validate.Limits(job, tuple(fwd.activations.shape[1:]), BATCH_SIZE)
    trainer = Inbound(topology.forward_queue(job), Source.FORWARD, frozenset({wire.Kind.FORWARD}),
                      limits.max_body_bytes())
    worker = Inbound(topology.reply_queue(job, CLIENT), Source.REPLY, frozenset({wire.Kind.BACKWARD}),
                     wire.MAX_MESSAGE_BYTES)

    def check_forward(m: Any) -> None:
        validate.check_forward(m, limits)

    def check_gradient(m: Any) -> None:
        validate.check_gradient(m.grad, tuple(m.grad.shape))

    return {"trainer": _side(fwd, trainer, topology.forward_routing_key(CLIENT), rules, check_forward, seconds),
            "worker": _side(bwd, worker, topology.reply_routing_key(CLIENT), rules, check_gradient, seconds)}


def _side(msg: wire.Forward | wire.Backward, inbound: Inbound, routing_key: str, rules: gate.GateRules,
          check: Callable[[Any], None], seconds: float) -> dict[str, Any]:
    """One party's validation of ``msg``: the gate's own checks (its decode replaced by the decoded
    message, so only size, kind, job, names and sender are timed), then the role's content check."""
    body = msg.encode()
    delivery = Delivery(queue=inbound.queue, body=body, delivery_tag=1, generation=1, redelivered=False,
                        message_id=topology.batch_id(CLIENT, msg.seq), correlation_id=None, reply_to=CLIENT,
                        user_id=None, routing_key=routing_key)
    decoded = wire.decode(body)
    copy = bytearray(len(body))

    def memcpy() -> None:
        copy[:] = body  # one copy of the whole message

    admit = per_call(lambda: gate.admit(delivery, inbound, rules), seconds)
    with mock.patch.object(wire, "decode", lambda _body: decoded):
        gate_checks = per_call(lambda: gate.admit(delivery, inbound, rules), seconds)
    decode = per_call(lambda: wire.decode(body), seconds)
    checks = per_call(lambda: check(decoded), seconds)
    copy_s = per_call(memcpy, seconds)
    valid = gate_checks + checks
    return {"message": msg.kind.value, "message_bytes": len(body), "gate_us": admit * 1e6,
            "decode_us": decode * 1e6, "gate_checks_us": gate_checks * 1e6, "checks_us": checks * 1e6,
            "validation_us": valid * 1e6, "memcpy_us": copy_s * 1e6, "validation_over_memcpy": valid / copy_s}


def run(model: str, seconds: float, dataset_name: str, *, in_flight: int) -> dict[str, Any]:
    """Every in-process reference, one after the other on this thread."""
    fwd, bwd = messages(model, dataset_name)
    return {
        "local": local.train_for(model, seconds, dataset_name=dataset_name),
        "bottom": bottom(model, 1, seconds, dataset_name),
        "bottom_stash": bottom(model, in_flight, seconds, dataset_name),
        "top": top(model, seconds, dataset_name),
        "validation": validation(model, min(seconds, VALIDATION_S), dataset_name),
        "request_bytes": len(fwd.encode()), "reply_bytes": len(bwd.encode()),
    }
