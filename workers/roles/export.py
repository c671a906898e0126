"""Export with consent: a holder hands its trained segment only to a requester it approved.

``ExportRole`` runs on every segment holder that serves (``splitmq server --serve``,
``splitmq predict``): an ``export`` request names the requester (the gate checked that the
sender is who it says) and the segment; the holder answers with the segment's parameters
only if its own consent file (``workers.consent``) approves that requester for this job,
else with an error naming itself. ``ExportClient`` is the requester's side: it asks every
holder, collects the answers until its deadline, and reports who did not approve.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from splitmq.shared import topology, wire
from splitmq.workers import consent
from splitmq.workers.exits import ExitReason, PartyExit, Wait
from splitmq.workers.roles.base import IfUnroutable, Inbound, Incoming, Role, Send, Source, Step, ToParty, ToStage

log = logging.getLogger(__name__)


class ExportRole(Role):
    """Answers export requests for this holder's segments, with its consent or with its refusal."""

    name = "export"

    def __init__(self, *, job_id: str, me: str, segments: dict[int, nn.Module], consent_path: Path) -> None:
        self.job_id, self.me, self.segments, self.consent_path = job_id, me, segments, consent_path

    def inbound(self) -> list[Inbound]:
        return [Inbound(topology.serve_queue(self.job_id, self.me), Source.FORWARD, frozenset({wire.Kind.EXPORT}),
                        wire.ENVELOPE_BYTES)]

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Export)
        requester = msg.client_id
        tensors: dict[str, torch.Tensor] = {}
        error = ""
        try:
            ok = consent.approved(self.consent_path, job_id=self.job_id, requester=requester)
        except ValueError as exc:
            ok, error = False, f"{self.me}: {exc}"
        if msg.segment not in self.segments:
            error = f"{self.me} holds no segment {msg.segment} (it holds {sorted(self.segments)})"
        elif not ok:
            error = error or (f"not approved: {self.me} has not approved an export of job {self.job_id} to "
                              f"{requester} (on its side: splitmq approve-export --job-id {self.job_id} "
                              f"--holder {self.me} --requester {requester})")
        else:
            tensors = {k: v.detach().cpu() for k, v in self.segments[msg.segment].state_dict().items()}
        log.info("%s: export of segment %d to %s: %s", self.me, msg.segment, requester, error or "granted")
        answer = wire.Segment(job_id=self.job_id, client_id=self.me, seq=msg.seq, tensors=tensors,
                              request_id=msg.request_id, segment=msg.segment, error=error)
        return Step(sends=[Send(ToParty(topology.serve_address(inc.reply_to or requester)), answer,
                                inc.correlation_id)], durable=False)


@dataclass
class Asked:
    """One segment asked of one holder, and what came back."""

    holder: str
    segment: int
    tensors: dict[str, torch.Tensor] | None = None
    error: str = ""

    @property
    def answered(self) -> bool:
        return self.tensors is not None or bool(self.error)


class ExportClient(Role):
    """Asks each holder for its segment; finished when every holder has answered or the deadline passed."""

    name = "export-client"

    def __init__(self, *, job_id: str, me: str, asks: list[tuple[str, int]], timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.job_id, self.me, self.timeout_s, self.clock = job_id, me, timeout_s, clock
        self.asked = {topology.export_id(me, h, s): Asked(h, s) for h, s in asks}
        self.since = clock()

    def inbound(self) -> list[Inbound]:
        return [Inbound(topology.answer_queue(self.job_id, self.me), Source.REPLY, frozenset({wire.Kind.SEGMENT}),
                        wire.MAX_MESSAGE_BYTES)]

    def start(self, now: float) -> Step:
        self.since = now
        sends = [Send(ToStage(topology.serve_address(a.holder)),
                      wire.Export(job_id=self.job_id, client_id=self.me, seq=0, request_id=cid, segment=a.segment),
                      cid, if_unroutable=IfUnroutable.TELL) for cid, a in self.asked.items()]
        return Step(sends=sends, durable=False)

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Segment)
        a = self.asked.get(inc.correlation_id)
        if a is None or a.answered or msg.client_id != a.holder:
            return Step(durable=False)  # not an answer we wait for (or one from someone else)
        if msg.error:
            a.error = msg.error
        else:
            a.tensors = {k: v.clone() for k, v in msg.tensors.items()}
        return Step(durable=False)

    def on_unroutable(self, send: Send, now: float) -> Step:
        a = self.asked.get(send.correlation_id)
        if a is not None and not a.answered:
            a.error = (f"not serving: nobody answers for {a.holder} (start `splitmq server --serve` or "
                       f"`splitmq predict --serve` as {a.holder})")
        return Step()

    def tick(self, now: float) -> Step:
        if now - self.since > self.timeout_s:
            for a in self.asked.values():
                if not a.answered:
                    a.error = f"no answer: {a.holder} did not answer within {self.timeout_s:g}s"
        return Step()

    def waits(self, now: float) -> list[Wait]:
        waiting = [a.holder for a in self.asked.values() if not a.answered]
        if not waiting:
            return []
        return [Wait(f"the segments of {', '.join(sorted(set(waiting)))}", self.since, self.timeout_s, expire=None)]

    def finished(self) -> PartyExit | None:
        if all(a.answered for a in self.asked.values()):
            return PartyExit(ExitReason.DONE, f"{len(self.asked)} holder answer(s)")
        return None
