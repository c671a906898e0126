"""Who takes part in a job, and the join desk that decides it.

A data owner joins by sending ``hello`` with its spec (the agreed job settings and its
model's fingerprint: cut shape and dtype, bottom parameters) and its facts (client index,
data size). The desk refuses, with the list of what differs, an owner whose spec is not
the job's, whose index is out of range or held by another owner, or whose conventional
name ``client-<i>`` disagrees with its index. Only members may send batches or take
part in rounds; a finished job is one where every expected owner has said ``bye``.
A middle hop passes each hello (and bye) on to the next stage and answers the owner
only when the next stage has: every stage of the chain knows every member.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from splitmq.shared import defaults, topology, wire
from splitmq.shared.config import differences
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.ledger import Ledger
from splitmq.workers.exits import ExitReason, PartyExit, Wait
from splitmq.workers.roles.base import IfUnroutable, Inbound, Incoming, Role, Send, Source, Step, ToParty, ToStage

log = logging.getLogger(__name__)

#: Spec keys that describe the model rather than the job settings.
MODEL_KEYS = ("cut_shape", "cut_dtype", "bottom_params")


@dataclass
class Member:
    name: str
    index: int
    num_samples: int
    batches_per_epoch: int
    model: dict[str, Any]
    done: bool = False


class Members:
    """The job's data owners: expected by index, known by name once joined."""

    def __init__(self, *, num_clients: int, epochs: int, spec: dict[str, Any], compare_bottoms: bool,
                 accepts: Callable[[dict[str, Any]], str] = lambda spec: "", compare_models: bool = True,
                 expected: frozenset[int] | None = None) -> None:
        self.num_clients, self.epochs = num_clients, epochs
        #: The owners this stage serves: all of the job's, or its shard's (``topology.shard_of``).
        self.expected = frozenset(range(num_clients)) if expected is None else expected
        self.spec = spec                       # this stage's agreed job settings
        self.compare_bottoms = compare_bottoms  # owners share bottoms (average, handoff): they must agree
        self.compare_models = compare_models    # False for a vertical split: each party's cut is its own
        self.accepts = accepts                 # does this stage's segment take that cut? "" or why not
        self.model: dict[str, Any] = {}        # the first member's model fingerprint
        self.last_seen = 0.0                   # when a member's message last came (on ``clock``)
        self.clock: Callable[[], float] = time.monotonic  # the join desk's (``JoinDesk.use_clock``)
        self.by_name: dict[str, Member] = {}

    def problems(self, name: str, spec: dict[str, Any], facts: dict[str, Any]) -> list[str]:
        """Why ``name`` cannot join with this spec and these facts (empty: it can)."""
        job = {k: v for k, v in spec.items() if k not in MODEL_KEYS}
        out = differences(self.spec, job)
        index = facts.get("client_index")
        conventional = topology.client_index(name)
        if not isinstance(index, int) or not 0 <= index < self.num_clients:
            out.append(f"client_index: {index!r} is not one of the job's {self.num_clients} owners "
                       f"(0..{self.num_clients - 1}); set num_clients or the index")
        elif conventional is not None and conventional != index:
            out.append(f"client_index: {name} must have index {conventional}, not {index}")
        elif index not in self.expected:
            out.append(f"client_index: owner {index} is not served here (this trainer serves owners "
                       f"{sorted(self.expected)}; check shards and the owner's stage)")
        else:
            holder = next((m.name for m in self.by_name.values() if m.index == index and m.name != name), None)
            if holder:
                out.append(f"client_index: {index} is already held by {holder}")
        theirs = {k: spec.get(k) for k in MODEL_KEYS if k != "bottom_params" or self.compare_bottoms}
        if self.model and self.compare_models:
            out += differences({k: self.model.get(k) for k in theirs}, theirs)
        else:
            why = self.accepts(spec)
            if why:
                out.append(why)
        return out

    def join(self, name: str, spec: dict[str, Any], facts: dict[str, Any]) -> Member:
        if not self.model:
            self.model = {k: spec.get(k) for k in MODEL_KEYS}
        member = Member(name, int(facts["client_index"]), int(facts.get("num_samples", 0)),
                        int(facts.get("batches_per_epoch", 0)), {k: spec.get(k) for k in MODEL_KEYS})
        self.by_name[name] = member
        return member

    def require(self, name: str) -> Member:
        """The member called ``name``.

        Raises:
            RejectedMessage: ``not_joined``: it never sent a hello this stage accepted.
        """
        member = self.by_name.get(name)
        if member is None:
            raise RejectedMessage("not_joined", f"{name} has not joined this job (send hello first)")
        self.last_seen = self.clock()  # every role asks for each member message: the stage is not idle
        return member

    def model_of(self, name: str) -> dict[str, Any]:
        """A member's model fingerprint (its cut shape, its bottom's parameters)."""
        member = self.by_name.get(name)
        return member.model if member is not None else {}

    def active_indexes(self) -> set[int]:
        """Owners a round waits for: every expected index except those that have finished."""
        done = {m.index for m in self.by_name.values() if m.done}
        return set(self.expected) - done

    def by_index(self, index: int) -> Member | None:
        return next((m for m in self.by_name.values() if m.index == index), None)

    def total_batches(self) -> int:
        """Training batches the job has over all owners (unknown owners estimated from known ones)."""
        known = [m.batches_per_epoch for m in self.by_name.values() if m.batches_per_epoch]
        if not known:
            return 1
        missing = max(0, len(self.expected) - len(known))
        return self.epochs * (sum(known) + missing * round(sum(known) / len(known)))

    def all_done(self) -> bool:
        return len([m for m in self.by_name.values() if m.done]) >= len(self.expected)

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "members": [asdict(m) for m in self.by_name.values()]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model = dict(state.get("model", {}))
        self.by_name = {m["name"]: Member(**m) for m in state.get("members", [])}


def _applies_every_batch(spec: dict[str, Any]) -> bool:
    """Whether this job's one trainer applies each batch its owners apply (no chain, vertical parts or shards)."""
    return len(spec.get("stages") or ()) == 1 and not spec.get("vertical_parts") and int(spec.get("shards", 1)) == 1


class JoinDesk(Role):
    """Answers hellos and byes at a stage; ends the stage when every owner is done."""

    name = "members"

    def __init__(self, members: Members, applied: Ledger, *, stage: str, job_id: str, forward_queue: str,
                 reply_queue: str | None = None, next_stage: Callable[[str], str] | None = None,
                 serve_forever: bool = False, idle_timeout_s: float = defaults.IDLE_TIMEOUT_S,
                 onward_spec: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.members, self.applied, self.stage, self.job_id = members, applied, stage, job_id
        self.forward_queue, self.reply_queue, self.next_stage = forward_queue, reply_queue, next_stage
        self.serve_forever, self.idle_timeout_s, self.clock = serve_forever, idle_timeout_s, clock
        self.onward_spec = onward_spec  # a middle hop: the spec the next stage sees (its own output shape)
        self.last_heard = clock()
        self.pending: dict[str, Incoming] = {}   # hellos passed on, by the correlation id we gave them
        self.fatal: PartyExit | None = None
        #: Owners' batches a transient job lost here (applied by the owner, not in our ledger), by owner.
        self.lost: dict[str, list[int]] = {}

    def use_clock(self, clock: Callable[[], float]) -> None:
        """The members' last message is timed on our clock too: the idle deadline compares the two."""
        super().use_clock(clock)
        self.members.clock = clock

    def inbound(self) -> list[Inbound]:
        kinds = frozenset({wire.Kind.HELLO, wire.Kind.BYE})
        out = [Inbound(self.forward_queue, Source.FORWARD, kinds, wire.ENVELOPE_BYTES)]
        if self.reply_queue is not None:
            out.append(Inbound(self.reply_queue, Source.REPLY, frozenset({wire.Kind.HELLO}), wire.ENVELOPE_BYTES))
        return out

    def start(self, now: float) -> Step:
        self.last_heard = self.clock()  # a standby may have waited long before taking over
        return Step()

    def handle(self, inc: Incoming) -> Step:
        self.last_heard = self.clock()
        msg = inc.msg
        if isinstance(msg, wire.Hello) and inc.source is Source.REPLY:
            return self._answered(inc, msg)
        if isinstance(msg, wire.Hello):
            return self._hello(inc, msg)
        assert isinstance(msg, wire.Bye)
        return self._bye(inc, msg)

    def _hello(self, inc: Incoming, msg: wire.Hello) -> Step:
        name, spec, facts = msg.client_id, dict(msg.spec), dict(msg.facts)
        problems = self.members.problems(name, spec, facts)
        if problems:
            log.error("%s: refused %s's join: %s", self.stage, name, "; ".join(problems))
            if not self.members.by_name and any(p.startswith("cut_shape") for p in problems):
                # The job's first owner and this stage disagree on the model itself: one of the two
                # is wrong, and nobody can train until it is fixed. (Once an owner trains, a
                # stranger's misfit cannot stop the stage.)
                self.fatal = PartyExit(ExitReason.CONFIG, f"{name}'s model does not fit this stage's: "
                                       + "; ".join(problems))
            return Step(sends=[self._answer(inc, msg, "; ".join(problems))], durable=False)
        self.members.join(name, spec, facts)
        log.info("%s: %s joined as owner %s (applied here: up to %d)", self.stage, name, facts.get("client_index"),
                 self.applied.prefix(name))
        if self.next_stage is None:
            return Step(sends=[self._answer(inc, msg, "")])
        cid = topology.relay_id(inc.correlation_id, self.stage)
        self.pending[cid] = inc
        onward = msg.copy(spec=self.onward_spec(spec) if self.onward_spec else spec,
                          facts={**facts, "relayed_by": self.stage})
        return Step(sends=[Send(ToStage(self.next_stage(name)), onward, cid, if_unroutable=IfUnroutable.RETRY)],
                    hold=("hello", cid))

    def _answered(self, inc: Incoming, msg: wire.Hello) -> Step:
        original = self.pending.pop(inc.correlation_id, None)
        if original is None:
            return Step(durable=False)
        assert isinstance(original.msg, wire.Hello)
        answer = self._answer(original, original.msg, msg.error)
        return Step(sends=[answer], settle=[("hello", inc.correlation_id)], durable=False)

    def _answer(self, inc: Incoming, msg: wire.Hello, error: str) -> Send:
        name = msg.client_id
        facts = {"stage": self.stage, "applied_prefix": self.applied.prefix(name),
                 "applied_above": self.applied.above(name)[:256]}
        answer = wire.Hello(job_id=self.job_id, client_id=name, seq=msg.seq, spec=self.members.spec,
                            facts=facts, error=error)
        return Send(ToParty(inc.reply_to or name), answer, inc.correlation_id)

    def _bye(self, inc: Incoming, msg: wire.Bye) -> Step:
        member = self.members.require(msg.client_id)
        member.done = member.done or msg.completed
        log.info("%s: %s left after %d batches (%s)", self.stage, member.name, msg.seq,
                 "completed" if msg.completed else msg.reason or "not completed")
        if msg.completed and _applies_every_batch(self.members.spec):
            self._check_complete(member.name, msg.seq)
        if self.next_stage is None:
            return Step()
        return Step(sends=[Send(ToStage(self.next_stage(member.name)), msg,
                                topology.relay_id(inc.correlation_id, self.stage))])

    def _check_complete(self, name: str, batches: int) -> None:
        """An owner applied ``batches``; if this stage applied fewer, their updates are lost here, never silently.

        It happens only when this stage restarted from a checkpoint without a batch it had answered and
        the batch's redelivery was lost too: with ``delivery = transient``, a broker restart at the same
        time; with ``durable``, the broker dead-lettering a forward after ``DELIVERY_LIMIT`` returns
        (the loop checkpoints a redelivered batch in the turn that applies it, so that takes the
        trainer dying that often within one turn)."""
        if self.applied.count(name) >= batches:
            return
        lost = [seq for seq in range(batches) if not self.applied.applied(name, seq)]
        self.lost[name] = lost
        log.error("%s: %s applied %d batches, this stage %d: the updates of batches %s are lost (this stage "
                  "restarted without them, from an older checkpoint or none, and their redelivery was lost)",
                  self.stage, name, batches, batches - len(lost), lost[:20])

    def waits(self, now: float) -> list[Wait]:
        if self.serve_forever:
            return []
        missing = [topology.client_name(i) if self.members.by_index(i) is None else
                   f"{self.members.by_index(i).name}" for i in sorted(self.members.active_indexes())]  # type: ignore[union-attr]
        since = max(self.last_heard, self.members.last_seen)  # any member message, not only hellos and byes
        return [Wait(f"messages from data owners ({', '.join(missing)} not finished)", since,
                     self.idle_timeout_s, ExitReason.IDLE,
                     "restarting them resumes the job; --idle-timeout sets this deadline")]

    def finished(self) -> PartyExit | None:
        if self.fatal is not None:
            return self.fatal
        if not self.serve_forever and self.members.all_done():
            if self.lost:
                return PartyExit(ExitReason.STATE_MISMATCH, "every data owner finished, but the updates of "
                                 + "; ".join(f"{n}'s batches {seqs[:20]}" for n, seqs in self.lost.items())
                                 + " are lost here (this stage restarted without them, from an older checkpoint or "
                                   "none, and their redelivery was lost: docs/guarantees.md): the trained weights "
                                   "lack them")
            return PartyExit(ExitReason.DONE, f"all {len(self.members.expected)} data owner(s) finished")
        return None

    def state(self) -> dict[str, Any]:
        return self.members.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.members.load_state(state)
