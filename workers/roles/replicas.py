"""Several trainers of one job (``shards`` > 1): their top replicas are merged every round.

SplitFed's multi-server form. Trainer ``k`` serves its shard of the data owners
(``topology.shard_of``) with its own replica of the top. When its shard's bottom-averaging
round closes (``roles.sync``), it sends every other trainer its part: the shard's bottom
average with the samples behind it, its top, and the top it started the round from. Once every
trainer's part is in, each trainer computes the same two things: the sample-weighted average
of the bottoms, which its owners get, and the merged top, which it adopts — the round's starting
top plus every trainer's change to it. One trainer would have applied all those changes in
sequence, so the merged top is, to first order, what one trainer would have reached on the
same batches; a plain average would count each trainer's progress once in T (measured in
docs/scaling.md). Every owner and every trainer starts the next round from the same bottom and
the same top, as they would with one trainer.

The rule for an absent trainer: a round waits for the other trainers' parts for the sync
timeout (``--sync-timeout``) after it closed here, then closes with the parts that came (the
log names the missing trainers); a part that arrives after its round closed is dropped. The
parts the others sent meanwhile wait, durable, in the absent trainer's queue: when it comes
back, it averages with them and is in step again from the next round on.

Pure bookkeeping over ``Send``s and tensors: the loop moves the messages.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from splitmq.shared import aggregate, topology, wire
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.stage import Stage
from splitmq.workers.exits import Wait
from splitmq.workers.roles.base import Inbound, Incoming, Role, Send, Source, Step, ToParty
from splitmq.workers.roles.sync import Outgoing, RoundEnd, Rounds, weights_send

log = logging.getLogger(__name__)

#: Prefixes of a part's tensor names: the shard's bottom average, the trainer's top, and the
#: top it started the round from.
BOTTOM, TOP, BASE = "bottom.", "top.", "base."
#: Closed rounds remembered, to tell a late part from one of a round not yet opened here.
_REMEMBERED = 8


@dataclass
class _Round:
    opened: float
    parts: dict[str, dict[str, Any]]               # trainer -> {"n", "bottom", "top", "base"}
    owners: list[Outgoing] = field(default_factory=list)  # who gets the bottom average here


class Replicas(Role, RoundEnd):
    """One trainer's side of averaging the top replicas (and the shards' bottoms) between trainers."""

    name = "replicas"

    def __init__(self, stage: Stage, rounds: Rounds, *, me: str, trainers: tuple[str, ...], job_id: str,
                 reply_queue: str, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if me not in trainers or len(trainers) < 2:
            raise ValueError(f"{me!r} must be one of two or more trainers, got {list(trainers)}")
        self.stage, self.rounds, self.me, self.trainers = stage, rounds, me, trainers
        self.job_id, self.reply_queue, self.timeout_s, self.clock = job_id, reply_queue, timeout_s, clock
        self.open: dict[int, _Round] = {}
        self.early: dict[int, dict[str, dict[str, Any]]] = {}  # parts of rounds not yet closed here
        self.done: list[int] = []                                # the last rounds closed here
        self.base = _copy(stage.segment.state_dict())            # the top this round started from
        self.averaged = 0

    def inbound(self) -> list[Inbound]:
        return [Inbound(self.reply_queue, Source.REPLY, frozenset({wire.Kind.WEIGHTS}), wire.MAX_MESSAGE_BYTES)]

    # ---- our own part ------------------------------------------------------------------------

    def closed(self, epoch: int, samples: int, outgoing: list[Outgoing]) -> list[Send]:
        """Our shard's round closed: send our part to the other trainers; the owners wait for the whole."""
        own: dict[str, Any] = {"n": samples, "bottom": dict(outgoing[0].tensors),
                               "top": _copy(self.stage.segment.state_dict()), "base": self.base}
        rnd = self.open[epoch] = _Round(self.clock(), {self.me: own, **self.early.pop(epoch, {})}, list(outgoing))
        tensors = {prefix + k: v for prefix, key in ((BOTTOM, "bottom"), (TOP, "top"), (BASE, "base"))
                   for k, v in own[key].items()}
        msg = wire.Weights(job_id=self.job_id, client_id=self.me, seq=epoch, num_samples=samples, tensors=tensors)
        cid = topology.request_id(self.me, "replica", epoch)
        sends = [Send(ToParty(t), msg, cid) for t in self.trainers if t != self.me]
        log.info("%s: epoch-%d round closed here (%d samples); sent our part to %s", self.me, epoch, samples,
                 [t for t in self.trainers if t != self.me])
        if set(rnd.parts) == set(self.trainers):
            sends += self._close(epoch).sends
        return sends

    def late(self, epoch: int, outgoing: list[Outgoing]) -> list[Send]:
        if epoch in self.open:  # the trainers' average is not done yet: this owner gets it with the others
            self.open[epoch].owners += outgoing
            return []
        return [weights_send(self.job_id, o) for o in outgoing]

    # ---- the other trainers' parts -------------------------------------------------------------

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Weights)
        part = self._part(msg)
        epoch, sender = msg.seq, msg.client_id
        if epoch in self.done:
            log.warning("%s: %s's part of the epoch-%d average came after the round closed here; dropped",
                        self.me, sender, epoch)
            return Step(durable=False)
        if epoch not in self.open:  # that trainer is ahead of us: keep its part for our round
            self.early.setdefault(epoch, {})[sender] = part
            return Step()
        rnd = self.open[epoch]
        rnd.parts[sender] = part
        return self._close(epoch) if set(rnd.parts) == set(self.trainers) else Step()

    def _part(self, msg: wire.Weights) -> dict[str, Any]:
        if msg.client_id not in self.trainers or msg.client_id == self.me:
            raise RejectedMessage("identity", f"a top replica from {msg.client_id!r}, which is not another trainer "
                                              f"of this job ({list(self.trainers)})")
        part: dict[str, Any] = {"n": msg.num_samples}
        for prefix, key in ((BOTTOM, "bottom"), (TOP, "top"), (BASE, "base")):
            part[key] = {k[len(prefix):]: v for k, v in msg.tensors.items() if k.startswith(prefix)}
        ours = {k: tuple(v.shape) for k, v in self.stage.segment.state_dict().items()}
        tops = [{k: tuple(v.shape) for k, v in part[key].items()} for key in ("top", "base")]
        if tops != [ours, ours] or not part["bottom"] or msg.num_samples < 1:
            raise RejectedMessage("shape", f"{msg.client_id}'s part has tops {sorted(part['top'])} and "
                                           f"{len(part['bottom'])} bottom tensors for {msg.num_samples} samples; "
                                           f"our top is {sorted(ours)}")
        return part

    def _close(self, epoch: int) -> Step:
        """Every part in (or the timeout): merge the tops and adopt that, give our owners the bottoms' average."""
        rnd = self.open.pop(epoch)
        parts = [rnd.parts[t] for t in sorted(rnd.parts)]  # one order everywhere: the same sums
        weights = [int(p["n"]) for p in parts]
        bottom = aggregate.weighted_average([p["bottom"] for p in parts], weights)
        top = merged_top([p["base"] for p in parts], [p["top"] for p in parts])
        self.stage.load_weights(top)
        self.base = _copy(top)
        self.rounds.results[epoch] = bottom  # an owner reporting late gets the trainers' average too
        self.done = (self.done + [epoch])[-_REMEMBERED:]
        self.averaged += 1
        log.info("%s: epoch-%d round of %d trainer(s) (%d samples): merged top adopted", self.me, epoch, len(parts),
                 sum(weights))
        sends = [weights_send(self.job_id, Outgoing(o.client, o.correlation_id, epoch, bottom)) for o in rnd.owners]
        return Step(sends=sends, checkpoint=True)

    # ---- deadlines, state -----------------------------------------------------------------------

    def tick(self, now: float) -> Step:
        step = Step()
        for epoch in [e for e, r in self.open.items() if now - r.opened > self.timeout_s]:
            log.warning("%s: closing the epoch-%d average without trainer(s) %s (no part within %.0fs)", self.me,
                        epoch, self._missing(epoch), self.timeout_s)
            step.add(self._close(epoch))
        return step

    def _missing(self, epoch: int) -> list[str]:
        return [t for t in self.trainers if t not in self.open[epoch].parts]

    def waits(self, now: float) -> list[Wait]:
        return [Wait(f"the parts of trainer(s) {self._missing(e)} for the epoch-{e} average", r.opened,
                     self.timeout_s, expire=None) for e, r in self.open.items()]

    def state(self) -> dict[str, Any]:
        return {"open": {e: {"parts": r.parts, "owners": [vars(o) for o in r.owners]} for e, r in self.open.items()},
                "early": self.early, "done": list(self.done), "averaged": self.averaged, "base": self.base}

    def load_state(self, state: dict[str, Any]) -> None:
        now = self.clock()
        self.open = {int(e): _Round(now, dict(r["parts"]), [Outgoing(**o) for o in r["owners"]])
                     for e, r in state.get("open", {}).items()}
        self.early = {int(e): dict(p) for e, p in state.get("early", {}).items()}
        self.done = [int(e) for e in state.get("done", [])]
        self.averaged = int(state.get("averaged", 0))
        self.base = dict(state.get("base") or self.base)

    def summary(self) -> dict[str, Any]:
        return {"rounds_averaged": self.averaged, "trainers": list(self.trainers)}


def merged_top(bases: list[dict[str, torch.Tensor]], tops: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The round's starting top (the bases' mean: one and the same while the trainers are in step)
    plus every trainer's change to it. The parts' tensor names and shapes were checked on arrival."""
    start = aggregate.weighted_average(bases, [1] * len(bases))
    out = {}
    for name, value in start.items():
        change = torch.stack([t[name].double() - b[name].double() for t, b in zip(tops, bases)]).sum(0)
        out[name] = (value.double() + change).to(value.dtype)
    return out


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
