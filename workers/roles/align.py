"""Finding the samples a vertical job trains on: the ids every party holds, by private set intersection.

The label holder (the top, ``AlignDesk``) asks each party that joins; each party
(``AlignAnswer``, in the owner's process) answers over its own ids; the top intersects what it
learned and sends every party the result, split into training and test ids by its own split.
Every party then trains on exactly those samples, in the order the top's seed gives. No id
outside the intersection is logged, stored or sent (shared/align.py says what crosses).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from splitmq.shared import align, data, defaults, topology, wire
from splitmq.shared.errors import RejectedMessage
from splitmq.workers.exits import Wait
from splitmq.workers.roles.base import Inbound, Incoming, Role, Send, Source, Step, ToParty, ToStage
from splitmq.workers.roles.members import Members

log = logging.getLogger(__name__)


class AlignDesk(Role):
    """The label holder's side."""

    name = "align"

    def __init__(self, members: Members, own: data.Data, *, job_id: str, forward_queue: str, parties: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.members, self.own, self.job_id, self.forward_queue = members, own, job_id, forward_queue
        self.parties, self.clock = parties, clock
        parts = [s for s in (own.train, own.test) if s is not None]
        self.ids = torch.cat([s.ids for s in parts])
        self.seeker: align.Seeker | None = None
        self.asked: dict[str, float] = {}
        self.told: set[str] = set()
        self.shared: dict[int, torch.Tensor] = {}
        self.result: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def train_count(self) -> int:
        return len(self.result[0]) if self.result is not None else 0

    def inbound(self) -> list[Inbound]:
        return [Inbound(self.forward_queue, Source.FORWARD, frozenset({wire.Kind.ALIGN}), wire.MAX_MESSAGE_BYTES)]

    def tick(self, now: float) -> Step:
        step = Step()
        for member in list(self.members.by_name.values()):
            cid = topology.request_id(member.name, "align", 0)
            if self.result is not None and member.name not in self.told:
                self.told.add(member.name)
                train, test = self.result
                msg = wire.Align(job_id=self.job_id, client_id=member.name, seq=0, phase="result",
                                 tensors={"train_ids": train, "test_ids": test})
                step.sends.append(Send(ToParty(member.name), msg, cid))
            elif self.result is None and member.name not in self.asked:
                self.seeker = self.seeker or align.Seeker(self.ids)
                self.asked[member.name] = now
                msg = wire.Align(job_id=self.job_id, client_id=member.name, seq=0, phase="request",
                                 tensors={"request": align.to_tensor(self.seeker.request),
                                          "count": torch.tensor([len(self.ids)])})
                step.sends.append(Send(ToParty(member.name), msg, cid))
        return step

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Align)
        member = self.members.require(msg.client_id)
        if msg.phase != "response" or self.seeker is None or set(msg.tensors) != {"setup", "response"}:
            raise RejectedMessage("kind", f"an align {msg.phase!r} message from {member.name} was not asked for")
        try:
            self.shared[member.index] = self.seeker.shared_with(align.to_bytes(msg.tensors["setup"]),
                                                                align.to_bytes(msg.tensors["response"]))
        except ValueError as exc:
            raise RejectedMessage("decode", str(exc)) from None
        if len(self.shared) == self.parties:
            self._conclude()
        return Step(checkpoint=self.result is not None)

    def _conclude(self) -> None:
        common = self.ids
        for ids in self.shared.values():
            common = common[torch.isin(common, ids)]
        train = torch.sort(common[torch.isin(common, self.own.train.ids)]).values
        test_ids = self.own.test.ids if self.own.test is not None else torch.empty(0, dtype=torch.int64)
        test = torch.sort(common[torch.isin(common, test_ids)]).values
        self.result = (train, test)
        log.info("align: the %d parties share %d samples (%d for training, %d for evaluation)", self.parties,
                 len(common), len(train), len(test))

    def waits(self, now: float) -> list[Wait]:
        if self.result is not None or not self.asked:
            return []
        missing = sorted(set(range(self.parties)) - set(self.shared))
        return [Wait(f"the private-set-intersection answers of parties {missing}", min(self.asked.values()),
                     defaults.PEER_TIMEOUT_S, expire=None)]

    def state(self) -> dict[str, Any]:
        return {"train_ids": self.result[0], "test_ids": self.result[1]} if self.result is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.result = (state["train_ids"], state["test_ids"])


class AlignAnswer(Role):
    """A party's side: answer the label holder's request over our ids; adopt the result."""

    name = "align"

    def __init__(self, own: data.Data, *, me: str, job_id: str, reply_queue: str, dest: str,
                 adopt: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        self.me, self.job_id, self.reply_queue, self.dest, self.adopt = me, job_id, reply_queue, dest, adopt
        self.ids = torch.cat([s.ids for s in (own.train, own.test) if s is not None])

    def inbound(self) -> list[Inbound]:
        return [Inbound(self.reply_queue, Source.REPLY, frozenset({wire.Kind.ALIGN}), wire.MAX_MESSAGE_BYTES)]

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Align)
        if msg.phase == "result":
            self.adopt(msg.tensors["train_ids"].clone(), msg.tensors["test_ids"].clone())
            return Step(durable=False)
        if msg.phase != "request" or "request" not in msg.tensors:
            raise RejectedMessage("kind", f"an align message of phase {msg.phase!r}")
        try:
            setup, response = align.answer(self.ids, align.to_bytes(msg.tensors["request"]),
                                           int(msg.tensors.get("count", torch.tensor([1]))[0]))
        except ValueError as exc:
            raise RejectedMessage("decode", str(exc)) from None
        answer = wire.Align(job_id=self.job_id, client_id=self.me, seq=0, phase="response",
                            tensors={"setup": align.to_tensor(setup), "response": align.to_tensor(response)})
        return Step(sends=[Send(ToStage(self.dest), answer, inc.correlation_id)], durable=False)
