"""Serving: the trained segments answer predictions through the same broker, forward only.

A serving role takes ``predict`` requests from its party's serve queue (never a training
queue), runs its segment with no graph and no stash, and passes the result on or back.
Nothing is applied, de-duplicated or checkpointed: a request lost with a crashed stage ends
at its requester's deadline as a ``timeout``. Every problem comes back as data: a
``prediction`` with a ``reason`` (``wire.Served``) and an ``error``, never a dead letter.

- ``ServeRole``: a stage of the chain. The last answers the requester; a middle one passes
  the request on and relays the answer back; a U-shaped owner's head hands its output to
  its own requester in-process (``deliver``): nothing past the cut ever sees it.
- ``VerticalServeRole``: the vertical top. It asks every other party for its part of the
  request's sample ids, joins the parts as training does, and answers; a part that does not
  come before the deadline ends the request with a ``timeout`` naming the party.
- ``PartServeRole``: a vertical party's bottom, answering the top's part requests from its
  own features, looked up by sample id.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitmq.shared import data, topology, validate, wire
from splitmq.shared.config import Combine
from splitmq.shared.stage import Stage
from splitmq.shared.wire import Served
from splitmq.workers.exits import Wait
from splitmq.workers.roles.base import IfUnroutable, Inbound, Incoming, Role, Send, Source, Step, ToParty, ToStage
from splitmq.workers.roles.vertical import join
from splitmq.workers.stats import Stats

log = logging.getLogger(__name__)


def answer(job_id: str, inc: Incoming, reason: Served, error: str = "", *, outputs: torch.Tensor | None = None,
           client_id: str = "") -> Send:
    """The ``prediction`` answering request ``inc`` (sent to the requester's answer queue)."""
    msg = inc.msg
    assert isinstance(msg, wire.Predict)
    out = wire.Prediction(job_id=job_id, client_id=client_id or msg.client_id, seq=msg.seq, outputs=outputs,
                          request_id=msg.request_id, reason=reason.value, error=error[:1000])
    return Send(ToParty(topology.serve_address(inc.reply_to or msg.client_id)), out, inc.correlation_id)


def check_inputs(msg: wire.Predict) -> str:
    """Why ``msg``'s inputs cannot be served ("" if they can): what no segment should be handed."""
    x = msg.inputs
    if x is None:
        return "the request has no inputs"
    if x.dtype != torch.float32:
        return f"inputs are {str(x.dtype).replace('torch.', '')}; float32 expected"
    if x.dim() < 2 or len(x) == 0:
        return f"inputs of shape {list(x.shape)}: expected (batch, features...) with at least one sample"
    if msg.sample_ids is not None and (msg.sample_ids.dtype != torch.int64 or msg.sample_ids.shape != (len(x),)):
        return f"sample ids of shape {list(msg.sample_ids.shape)} for {len(x)} samples"
    if not validate.all_finite(x):
        return "inputs hold NaN or Inf"
    return ""


def infer(stage: Stage, x: torch.Tensor, who: str) -> tuple[torch.Tensor | None, str]:
    """The segment's output, or why it could not take ``x`` (a shape it was not trained for)."""
    try:
        return stage.infer(x), ""
    except (RuntimeError, ValueError, IndexError) as exc:
        return None, f"{who} cannot take inputs of shape {list(x.shape)}: {exc}"


@dataclass
class _Open:
    """A request passed on to the next stage, until its answer (or its deadline)."""

    inc: Incoming
    dest: str
    deadline: float          # wall clock, as the request carries it
    since: float             # monotonic
    budget_s: float          # from since to the deadline
    answers: bool = True     # False: the next stage (an owner's own head) never answers us


class ServeRole(Role):
    """A chain stage serving predictions: the last answers, a middle one passes on, a head delivers."""

    name = "serve"

    def __init__(self, stage: Stage, *, job_id: str, address: str, stats: Stats,
                 next_stage: Callable[[str], str] | None = None, next_answers: bool = True,
                 deliver: Callable[[str, torch.Tensor], None] | None = None,
                 accept_from: frozenset[str] | None = None, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.job_id, self.address, self.stats = stage, job_id, address, stats
        self.next_stage, self.next_answers, self.deliver = next_stage, next_answers, deliver
        self.accept_from, self.wall, self.clock = accept_from, wall, clock
        self.open: dict[str, _Open] = {}   # by the correlation id we gave the onward request

    def inbound(self) -> list[Inbound]:
        out = [Inbound(topology.serve_queue(self.job_id, self.address), Source.FORWARD,
                       frozenset({wire.Kind.PREDICT}), wire.MAX_MESSAGE_BYTES)]
        if self.next_stage is not None and self.next_answers:
            out.append(Inbound(topology.answer_queue(self.job_id, self.address), Source.REPLY,
                               frozenset({wire.Kind.PREDICTION}), wire.MAX_MESSAGE_BYTES))
        return out

    def handle(self, inc: Incoming) -> Step:
        if inc.source is Source.REPLY:
            assert isinstance(inc.msg, wire.Prediction)
            return self._relayed(inc, inc.msg)
        msg = inc.msg
        assert isinstance(msg, wire.Predict)
        started = time.perf_counter()
        if self.accept_from is not None and inc.sender not in self.accept_from:
            return self._done(inc, Served.INVALID, f"{self.address} serves only {sorted(self.accept_from)}", started)
        if self.wall() > msg.deadline:
            return self._done(inc, Served.EXPIRED, f"the deadline had passed when {self.address} took it up", started)
        why = check_inputs(msg)
        out, why = (None, why) if why else infer(self.stage, msg.inputs, self.address)  # type: ignore[arg-type]
        if out is None:
            return self._done(inc, Served.INVALID, f"{self.address}: {why}", started)
        if self.deliver is not None:  # an owner's own head: the prediction stays in this process
            self.deliver(msg.request_id, out)
            self.stats.served(Served.OK.value, time.perf_counter() - started)
            return Step(durable=False)
        if self.next_stage is None:
            return self._done(inc, Served.OK, "", started, outputs=out)
        dest = self.next_stage(msg.client_id)
        cid = topology.relay_id(inc.correlation_id, self.address)
        self.open[cid] = _Open(inc, dest, msg.deadline, self.clock(), msg.deadline - self.wall(), self.next_answers)
        onward = msg.copy(inputs=out, model_version=self.stage.version)
        return Step(sends=[Send(ToStage(topology.serve_address(dest)), onward, cid,
                                if_unroutable=IfUnroutable.TELL)], durable=False)

    def _done(self, inc: Incoming, reason: Served, error: str, started: float, *,
              outputs: torch.Tensor | None = None) -> Step:
        self.stats.served(reason.value, time.perf_counter() - started)
        if reason is not Served.OK:
            log.info("%s: request %s from %s: %s: %s", self.address, inc.correlation_id, inc.reply_to, reason.value,
                     error)
        return Step(sends=[answer(self.job_id, inc, reason, error, outputs=outputs)], durable=False)

    def _relayed(self, inc: Incoming, msg: wire.Prediction) -> Step:
        p = self.open.pop(inc.correlation_id, None)
        if p is None:  # an answer after we gave up on it
            return Step(durable=False)
        self.stats.served(msg.reason)
        original = p.inc.msg
        back = msg.copy(client_id=original.client_id)
        return Step(sends=[Send(ToParty(topology.serve_address(p.inc.reply_to or original.client_id)), back,
                                p.inc.correlation_id)], durable=False)

    def on_unroutable(self, send: Send, now: float) -> Step:
        p = self.open.pop(send.correlation_id, None)
        if p is None:
            return Step()
        self.stats.served(Served.UNAVAILABLE.value)
        return Step(sends=[answer(self.job_id, p.inc, Served.UNAVAILABLE,
                                  f"nobody serves {p.dest} now (start it with --serve)")], durable=False)

    def tick(self, now: float) -> Step:
        wall, step = self.wall(), Step(durable=False)
        for cid, p in list(self.open.items()):
            if wall <= p.deadline:
                continue
            del self.open[cid]
            if p.answers:
                self.stats.served(Served.TIMEOUT.value)
                step.sends.append(answer(self.job_id, p.inc, Served.TIMEOUT,
                                         f"{p.dest} did not answer before the deadline"))
        return step

    def waits(self, now: float) -> list[Wait]:
        if not self.open:
            return []
        p = min(self.open.values(), key=lambda o: o.since)
        return [Wait(f"{p.dest}'s answer to request {p.inc.correlation_id}", p.since, p.budget_s, expire=None)]


@dataclass
class _Join:
    """A vertical request: the requester's part, and the parts asked of the other parties."""

    inc: Incoming
    ids: torch.Tensor
    parts: dict[int, torch.Tensor]
    deadline: float                                   # wall clock
    since: float                                      # monotonic
    budget_s: float                                   # from since to the deadline
    asked: dict[str, tuple[int, str]] = field(default_factory=dict)  # our correlation id -> (index, name)


class VerticalServeRole(Role):
    """The vertical top serving predictions: join every party's part of the same samples, then answer."""

    name = "serve"

    def __init__(self, stage: Stage, *, job_id: str, address: str, parties: int, combine: Combine,
                 party_name: Callable[[int], str], index_of: Callable[[str], int | None], stats: Stats,
                 timeout_s: float, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.job_id, self.address, self.parties, self.combine = stage, job_id, address, parties, combine
        self.party_name, self.index_of, self.stats, self.timeout_s = party_name, index_of, stats, timeout_s
        self.wall, self.clock = wall, clock
        self.joins: dict[str, _Join] = {}      # by the requester's correlation id
        self.asked: dict[str, str] = {}        # our part request's correlation id -> the join's key

    def inbound(self) -> list[Inbound]:
        return [Inbound(topology.serve_queue(self.job_id, self.address), Source.FORWARD,
                        frozenset({wire.Kind.PREDICT}), wire.MAX_MESSAGE_BYTES),
                Inbound(topology.answer_queue(self.job_id, self.address), Source.REPLY,
                        frozenset({wire.Kind.PREDICTION}), wire.MAX_MESSAGE_BYTES)]

    def handle(self, inc: Incoming) -> Step:
        if inc.source is Source.REPLY:
            assert isinstance(inc.msg, wire.Prediction)
            return self._part(inc, inc.msg)
        msg = inc.msg
        assert isinstance(msg, wire.Predict)
        index = self.index_of(msg.client_id)
        why = check_inputs(msg) or ("" if msg.sample_ids is not None else "a vertical request needs sample ids")
        if index is None:
            why = f"{msg.client_id} is not one of the job's {self.parties} parties"
        if self.wall() > msg.deadline:
            return self._end(inc, Served.EXPIRED, "the deadline had passed when the top took it up")
        if why:
            return self._end(inc, Served.INVALID, f"{self.address}: {why}")
        assert msg.inputs is not None and msg.sample_ids is not None and index is not None
        key = inc.correlation_id
        deadline = min(msg.deadline, self.wall() + self.timeout_s)
        j = self.joins[key] = _Join(inc, msg.sample_ids, {index: msg.inputs}, deadline, self.clock(),
                                    deadline - self.wall())
        step = Step(durable=False)
        for i in range(self.parties):
            if i == index:
                continue
            name = self.party_name(i)
            cid = topology.relay_id(key, name)
            j.asked[cid], self.asked[cid] = (i, name), key
            ask = wire.Predict(job_id=self.job_id, client_id=msg.client_id, seq=msg.seq, sample_ids=msg.sample_ids,
                               request_id=msg.request_id, deadline=j.deadline)
            step.sends.append(Send(ToStage(topology.serve_address(name)), ask, cid, if_unroutable=IfUnroutable.TELL))
        return step.add(self._complete(key)) if len(j.parts) == self.parties else step

    def _part(self, inc: Incoming, msg: wire.Prediction) -> Step:
        key = self.asked.pop(inc.correlation_id, None)
        j = self.joins.get(key) if key is not None else None
        if j is None or key is None:
            return Step(durable=False)  # the request ended already
        index, name = j.asked[inc.correlation_id]
        if msg.reason != Served.OK.value:
            return self._end(j.inc, Served(msg.reason), f"{name}'s part: {msg.error}", key=key)
        if msg.outputs is None or len(msg.outputs) != len(j.ids) or msg.outputs.dim() != 2:
            return self._end(j.inc, Served.INVALID, f"{name} sent a part that is not (batch {len(j.ids)}, width)",
                             key=key)
        j.parts[index] = msg.outputs
        return self._complete(key) if len(j.parts) == self.parties else Step(durable=False)

    def _complete(self, key: str) -> Step:
        j = self.joins[key]
        parts = [j.parts[i] for i in sorted(j.parts)]
        try:
            joined = join(parts, self.combine)                                  # (B, joined width)
        except RuntimeError as exc:
            return self._end(j.inc, Served.INVALID, f"the parts cannot be joined: {exc}", key=key)
        out, why = infer(self.stage, joined, self.address)
        if out is None:
            return self._end(j.inc, Served.INVALID, why, key=key)
        return self._end(j.inc, Served.OK, "", key=key, outputs=out)

    def _end(self, inc: Incoming, reason: Served, error: str, *, key: str | None = None,
             outputs: torch.Tensor | None = None) -> Step:
        j = self.joins.pop(key, None) if key is not None else None
        if j is not None:
            for cid in j.asked:
                self.asked.pop(cid, None)
        self.stats.served(reason.value, self.clock() - j.since if j is not None else None)
        if reason is not Served.OK:
            log.info("%s: request %s from %s: %s: %s", self.address, inc.correlation_id, inc.reply_to, reason.value,
                     error)
        return Step(sends=[answer(self.job_id, inc, reason, error, outputs=outputs)], durable=False)

    def on_unroutable(self, send: Send, now: float) -> Step:
        key = self.asked.get(send.correlation_id)
        j = self.joins.get(key) if key is not None else None
        if j is None:
            return Step()
        _, name = j.asked[send.correlation_id]
        return self._end(j.inc, Served.UNAVAILABLE, f"{name} is not serving its part (run `splitmq predict "
                         f"--serve` as {name})", key=key)

    def tick(self, now: float) -> Step:
        step, wall = Step(durable=False), self.wall()
        for key, j in list(self.joins.items()):
            if wall > j.deadline:
                missing = sorted(name for cid, (i, name) in j.asked.items() if i not in j.parts)
                step.add(self._end(j.inc, Served.TIMEOUT, f"no part from {', '.join(missing)} within "
                                   f"{j.budget_s:.1f}s (is `splitmq predict --serve` running on their side?)",
                                   key=key))
        return step

    def waits(self, now: float) -> list[Wait]:
        if not self.joins:
            return []
        j = min(self.joins.values(), key=lambda x: x.since)
        return [Wait(f"the other parties' parts of request {j.inc.correlation_id}", j.since, j.budget_s,
                     expire=None)]


class PartServeRole(Role):
    """A vertical party's bottom, answering the top's requests for its part of some samples."""

    name = "part"

    def __init__(self, stage: Stage, *, job_id: str, me: str, top: str, samples: data.Data, stats: Stats) -> None:
        self.stage, self.job_id, self.me, self.top, self.stats = stage, job_id, me, top, stats
        self.samples = data.pool(samples)
        self.row = {int(i): r for r, i in enumerate(self.samples.ids)}

    def inbound(self) -> list[Inbound]:
        return [Inbound(topology.serve_queue(self.job_id, self.me), Source.FORWARD,
                        frozenset({wire.Kind.PREDICT}), wire.ENVELOPE_BYTES + 8 * 1024 * 1024)]

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Predict)
        started = time.perf_counter()
        if inc.sender != self.top:  # a part is the top's to ask for: anyone else would learn our features' image
            return self._done(inc, Served.INVALID, f"{self.me} gives its part only to {self.top}", started)
        if msg.sample_ids is None:
            return self._done(inc, Served.INVALID, "a part request needs sample ids", started)
        unknown = [int(i) for i in msg.sample_ids if int(i) not in self.row][:5]
        if unknown:
            return self._done(inc, Served.INVALID, f"{self.me} holds no sample with id {unknown}", started)
        batch = self.samples.batch(torch.tensor([self.row[int(i)] for i in msg.sample_ids], dtype=torch.int64))
        assert batch.x is not None
        out, why = infer(self.stage, batch.x, self.me)
        if out is None:
            return self._done(inc, Served.FAILED, why, started)
        return self._done(inc, Served.OK, "", started, outputs=out)

    def _done(self, inc: Incoming, reason: Served, error: str, started: float, *,
              outputs: torch.Tensor | None = None) -> Step:
        self.stats.served(reason.value, time.perf_counter() - started)
        return Step(sends=[answer(self.job_id, inc, reason, error, outputs=outputs, client_id=self.me)], durable=False)
