"""Bottom sync between data owners: Independent, Average (SplitFed), Handoff (SplitNN).

Owner side, a small ABC with one method per decision: what to send after training an epoch,
whether to wait for an answer to it, and whether an epoch must wait for its turn. Trainer
side, ``Rounds`` (average) and ``Handoffs`` (relay to the next owner): pure bookkeeping that
returns the Weights to send. With one data owner there is nothing to sync: every policy is
then Independent, so a one-owner job needs no flag.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from splitmq.shared import aggregate, defaults, topology, wire
from splitmq.shared.config import BottomSync
from splitmq.shared.errors import RejectedMessage
from splitmq.workers.exits import Wait
from splitmq.workers.roles.base import Inbound, Incoming, Role, Send, Source, Step, ToParty
from splitmq.workers.roles.members import Members
from splitmq.workers.stats import Stats

log = logging.getLogger(__name__)


class OwnerSync(ABC):
    """What a data owner does with its bottom at epoch boundaries."""

    @abstractmethod
    def shares_after(self, epoch: int) -> bool:
        """Send the bottom after training ``epoch``."""

    @abstractmethod
    def waits_for_average(self, epoch: int) -> bool:
        """After sending, wait for an averaged bottom to adopt."""

    @abstractmethod
    def waits_for_turn(self, epoch: int) -> bool:
        """Before training ``epoch``, wait for the previous owner's bottom."""


class Independent(OwnerSync):
    def shares_after(self, epoch: int) -> bool:
        return False

    def waits_for_average(self, epoch: int) -> bool:
        return False

    def waits_for_turn(self, epoch: int) -> bool:
        return False


@dataclass(frozen=True)
class Average(OwnerSync):
    sync_every: int

    def shares_after(self, epoch: int) -> bool:
        return (epoch + 1) % self.sync_every == 0

    def waits_for_average(self, epoch: int) -> bool:
        return self.shares_after(epoch)

    def waits_for_turn(self, epoch: int) -> bool:
        return False


@dataclass(frozen=True)
class Handoff(OwnerSync):
    index: int

    def shares_after(self, epoch: int) -> bool:
        return True

    def waits_for_average(self, epoch: int) -> bool:
        return False

    def waits_for_turn(self, epoch: int) -> bool:
        return (epoch, self.index) != (0, 0)


def owner_policy(mode: BottomSync, *, num_clients: int, index: int, sync_every: int) -> OwnerSync:
    if num_clients == 1 or mode is BottomSync.INDEPENDENT:
        return Independent()
    if mode is BottomSync.AVERAGE:
        return Average(sync_every)
    return Handoff(index)


# ---- trainer side ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Outgoing:
    """Send ``tensors`` as a Weights message for ``epoch`` to ``client`` under ``correlation_id``."""

    client: str
    correlation_id: str
    epoch: int
    tensors: dict[str, torch.Tensor]


@dataclass
class _Round:
    opened: float
    entries: dict[str, dict[str, Any]]


class Rounds:
    """SplitFed averaging: each round waits for every expected owner, or closes after a timeout.

    Owners are counted by index, each once, with the sample count it declared when it joined;
    a round's result is kept for the next round too, so an owner that reports late still gets
    the average it missed.
    """

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.open: dict[int, _Round] = {}
        self.results: dict[int, dict[str, torch.Tensor]] = {}
        self.samples: dict[int, int] = {}  # the samples behind each result (its weight among shards)

    def contribute(self, *, epoch: int, index: int, client: str, correlation_id: str,
                   tensors: dict[str, torch.Tensor], num_samples: int, expected: set[int],
                   now: float) -> list[Outgoing]:
        """Add one owner's bottom; returns what to send (the average, once the round closes)."""
        if epoch in self.results:  # late or repeated: the round is closed, hand out its result
            return [Outgoing(client, correlation_id, epoch, self.results[epoch])]
        rnd = self.open.setdefault(epoch, _Round(now, {}))
        rnd.entries[str(index)] = {"tensors": {k: v.clone() for k, v in tensors.items()}, "n": num_samples,
                                   "cid": correlation_id, "client": client}
        return self.close(epoch) if {str(i) for i in expected} <= set(rnd.entries) else []

    def close(self, epoch: int) -> list[Outgoing]:
        rnd = self.open.pop(epoch)
        self.results[epoch] = aggregate.weighted_average([e["tensors"] for e in rnd.entries.values()],
                                                         [e["n"] for e in rnd.entries.values()])
        self.samples[epoch] = sum(int(e["n"]) for e in rnd.entries.values())
        for old in [e for e in self.results if e < epoch - 1]:
            del self.results[old]
            self.samples.pop(old, None)
        return [Outgoing(e["client"], e["cid"], epoch, self.results[epoch]) for e in rnd.entries.values()]

    def overdue(self, now: float) -> list[int]:
        return [e for e, r in self.open.items() if now - r.opened > self.timeout_s]

    def missing(self, epoch: int, expected: set[int]) -> list[int]:
        return sorted(i for i in expected if str(i) not in self.open[epoch].entries)

    def state(self) -> dict[str, Any]:
        return {"open": {e: r.entries for e, r in self.open.items()}, "results": self.results}

    def load_state(self, state: dict[str, Any], now: float) -> None:
        self.open = {int(e): _Round(now, entries) for e, entries in state.get("open", {}).items()}
        self.results = {int(e): r for e, r in state.get("results", {}).items()}


class RoundEnd(ABC):
    """Where a closed round's average goes: to the owners at once (one trainer), or first into
    the average of every trainer's shard (a sharded job: ``roles.replicas``)."""

    @abstractmethod
    def closed(self, epoch: int, samples: int, outgoing: list[Outgoing]) -> list[Send]:
        """The round of ``epoch`` closed here with ``samples`` samples behind it: what to send now."""

    @abstractmethod
    def late(self, epoch: int, outgoing: list[Outgoing]) -> list[Send]:
        """An owner reported to a round that had closed: what to send it."""


class ToOwners(RoundEnd):
    """One trainer: its round's average is the job's."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def closed(self, epoch: int, samples: int, outgoing: list[Outgoing]) -> list[Send]:
        return [weights_send(self.job_id, o) for o in outgoing]

    def late(self, epoch: int, outgoing: list[Outgoing]) -> list[Send]:
        return [weights_send(self.job_id, o) for o in outgoing]


def weights_send(job_id: str, out: Outgoing) -> Send:
    """An average (or a hand-off) for one owner, answering its request."""
    msg = wire.Weights(job_id=job_id, client_id=out.client, seq=out.epoch, tensors=out.tensors)
    return Send(ToParty(out.client), msg, out.correlation_id)


def next_turn(*, epoch: int, index: int, num_clients: int, epochs: int) -> tuple[int, int] | None:
    """SplitNN turn-taking: after owner ``index`` trains ``epoch``, (next owner, its epoch); None at the end."""
    nxt = (index + 1) % num_clients
    next_epoch = epoch + 1 if nxt == 0 else epoch
    return None if next_epoch >= epochs else (nxt, next_epoch)


class SyncDesk(Role):
    """The trainer's side of bottom sync: averages rounds, or passes the bottom to the next owner."""

    name = "sync"

    def __init__(self, members: Members, *, mode: BottomSync, job_id: str, forward_queue: str,
                 timeout_s: float, stats: Stats, round_end: RoundEnd | None = None) -> None:
        self.members, self.mode, self.job_id, self.forward_queue = members, mode, job_id, forward_queue
        self.stats = stats
        self.round_end = round_end or ToOwners(job_id)
        self.rounds = Rounds(timeout_s=timeout_s)
        self.turns: dict[int, Outgoing] = {}  # hand-offs waiting for their owner to join, by index

    def inbound(self) -> list[Inbound]:
        return [Inbound(self.forward_queue, Source.FORWARD, frozenset({wire.Kind.WEIGHTS}), self._max_body)]

    def _max_body(self) -> int:
        """A bottom's parameters at 8 bytes each plus the envelope, once the first owner said what they are."""
        if self.mode is BottomSync.INDEPENDENT or self.members.num_clients == 1:
            return wire.ENVELOPE_BYTES  # no bottoms are taken here: anything bigger is refused unread
        params = self.members.model.get("bottom_params")
        if not params:
            return wire.MAX_MESSAGE_BYTES
        values = int(sum(math.prod(shape) for _, shape in params))
        return min(wire.MAX_MESSAGE_BYTES, 8 * values + 64 * len(params) + wire.ENVELOPE_BYTES)

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Weights)
        member = self.members.require(msg.client_id)
        if self.mode is BottomSync.INDEPENDENT or self.members.num_clients == 1:
            raise RejectedMessage("kind", f"this job's owners do not share bottoms (bottom_sync {self.mode.value})")
        if msg.num_samples != member.num_samples:
            raise RejectedMessage("membership", f"{member.name} declared {member.num_samples} samples when it "
                                                f"joined, its weights say {msg.num_samples}")
        expected = {name: tuple(shape) for name, shape in (self.members.model.get("bottom_params") or [])}
        got = {k: tuple(v.shape) for k, v in msg.tensors.items()}
        if expected and got != expected:
            raise RejectedMessage("shape", f"{member.name}'s bottom has parameters {sorted(got.items())}, the "
                                           f"job's are {sorted(expected.items())}")
        if self.mode is BottomSync.AVERAGE:
            late = msg.seq in self.rounds.results
            outs = self.rounds.contribute(epoch=msg.seq, index=member.index, client=member.name,
                                          correlation_id=inc.correlation_id, tensors=dict(msg.tensors),
                                          num_samples=msg.num_samples, expected=self.members.active_indexes(),
                                          now=self.clock())
            if late:
                return Step(sends=self.round_end.late(msg.seq, outs))
            return Step(sends=self._closed(msg.seq, outs) if outs else [])
        turn = next_turn(epoch=msg.seq, index=member.index, num_clients=self.members.num_clients,
                         epochs=self.members.epochs)
        if turn is None:
            return Step()
        index, epoch = turn
        self.turns[index] = Outgoing("", "", epoch, {k: v.clone() for k, v in msg.tensors.items()})
        return self.tick(self.clock())

    def _send(self, out: Outgoing) -> Send:
        return weights_send(self.job_id, out)

    def _closed(self, epoch: int, outs: list[Outgoing]) -> list[Send]:
        return self.round_end.closed(epoch, self.rounds.samples.get(epoch, 0), outs)

    def tick(self, now: float) -> Step:
        step = Step()
        for epoch in self.rounds.overdue(now):
            missing = self.rounds.missing(epoch, self.members.active_indexes())
            log.warning("sync: closing the epoch-%d average without owner(s) %s (no bottom within %.0fs)", epoch,
                        missing, self.rounds.timeout_s)
            step.sends += self._closed(epoch, self.rounds.close(epoch))
        for index, out in list(self.turns.items()):
            member = self.members.by_index(index)
            if member is not None:  # its owner has joined: its reply queue exists
                del self.turns[index]
                cid = topology.request_id(member.name, "turn", out.epoch)
                step.sends.append(self._send(Outgoing(member.name, cid, out.epoch, out.tensors)))
        return step

    def waits(self, now: float) -> list[Wait]:
        out = []
        for epoch, rnd in self.rounds.open.items():
            missing = self.rounds.missing(epoch, self.members.active_indexes())
            out.append(Wait(f"the bottoms of owner(s) {missing} for the epoch-{epoch} average", rnd.opened,
                            self.rounds.timeout_s, expire=None))
        for index, turn in self.turns.items():
            out.append(Wait(f"owner {index} to join, to hand it the bottom for epoch {turn.epoch}", now,
                            defaults.TURN_TIMEOUT_S, expire=None))
        return out

    def state(self) -> dict[str, Any]:
        return {"rounds": self.rounds.state(), "turns": {i: vars(o) for i, o in self.turns.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rounds.load_state(state.get("rounds", {}), self.clock())
        self.turns = {int(i): Outgoing(**o) for i, o in state.get("turns", {}).items()}
