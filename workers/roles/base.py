"""What a role is: it takes a message and returns the messages to send. No pika, no loop.

A role (Flower's strategies) does the model work of one part of a split-learning job: the
bottom of a data owner, the top with the loss, a middle hop, the vertical top, a join desk.
The party loop (``splitmq.workers.party``) owns the transport, the gate, exact dedupe, acks,
checkpoints, waits and exits; it calls a role's ``handle`` with each decoded, validated
message addressed to it, and its ``tick`` between messages, and carries out the ``Step``
they return. Roles are unit-tested by calling these methods directly.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Hashable, Sequence, Union

from splitmq.shared import wire
from splitmq.shared.ledger import Ledger
from splitmq.workers.exits import PartyExit, Wait


class Source(str, Enum):
    """Which of a party's queues a message came from."""

    FORWARD = "forward"  # the forward queue of one of our stages: activations, hellos, weights, byes
    REPLY = "reply"      # our reply queue: answers to what we sent


@dataclass(frozen=True)
class Inbound:
    """A queue the role consumes, what may arrive there, and the largest valid body.

    ``max_body`` may be a callable: a stage learns its cut shape when the first owner joins,
    and from then on refuses, unread, any body bigger than a full batch of that shape.
    """

    queue: str
    source: Source
    kinds: frozenset[wire.Kind]
    max_body: int | Callable[[], int]

    def limit(self) -> int:
        return self.max_body() if callable(self.max_body) else self.max_body

    def merge(self, other: Inbound) -> Inbound:
        """Two roles taking different kinds from one queue: one consumer, the union of what it takes."""
        return Inbound(self.queue, self.source, self.kinds | other.kinds, lambda: max(self.limit(), other.limit()))


@dataclass(frozen=True)
class Incoming:
    """A decoded message and the envelope facts a role may need (never a delivery tag)."""

    msg: wire.AnyMessage
    source: Source
    queue: str
    sender: str                 # the routing key's sender part for forward messages, else ""
    reply_to: str
    correlation_id: str
    user_id: str | None = None
    redelivered: bool = False


@dataclass(frozen=True)
class ToStage:
    """A forward message to stage ``dest`` (activations exchange, routing key ``<me>.<dest>``)."""

    dest: str


@dataclass(frozen=True)
class ToParty:
    """An answer to party ``party`` (gradients exchange, routing key ``<party>``)."""

    party: str


Route = Union[ToStage, ToParty]


class IfUnroutable(str, Enum):
    """What to do when no queue takes a send (its receiver's queue does not exist)."""

    DROP = "drop"    # log it: the receiver is gone (a reply to a removed client)
    RETRY = "retry"  # send it again shortly: the receiver has not started yet
    TELL = "tell"    # hand it back to the role (``on_unroutable``)


@dataclass(frozen=True)
class Send:
    """One message to publish. ``message_id`` defaults to the correlation id."""

    route: Route
    msg: wire.Message
    correlation_id: str
    message_id: str = ""
    if_unroutable: IfUnroutable = IfUnroutable.DROP


@dataclass
class Step:
    """What handling a message (or a tick) produced.

    ``hold`` keeps the incoming delivery unacknowledged under a key until a later step lists
    that key in ``settle`` (a middle hop holds a batch until the next stage answers).
    ``applied`` names the training batches ``(client, seq)`` whose effect is now in the role's
    state: the loop records them, so a repeat is answered and never applied again.
    ``durable`` False: the effect needs no checkpoint (an evaluation, an answer to a repeat);
    the delivery is acked once the sends are confirmed. ``checkpoint`` asks for one now.
    """

    sends: list[Send] = field(default_factory=list)
    hold: Hashable | None = None
    settle: list[Hashable] = field(default_factory=list)
    applied: list[tuple[str, int]] = field(default_factory=list)
    durable: bool = True
    checkpoint: bool = False

    def add(self, other: "Step") -> "Step":
        """Merge ``other`` into this step (``hold`` and ``durable`` stay this step's)."""
        self.sends += other.sends
        self.settle += other.settle
        self.applied += other.applied
        self.checkpoint = self.checkpoint or other.checkpoint
        return self


class Role(ABC):
    """One part of a job inside a party process."""

    #: Name used in logs, checkpoints and summaries.
    name: str = "role"
    #: The batches this role has applied; the loop answers a repeat from it and never applies it twice.
    ledger: Ledger | None = None
    #: Monotonic seconds for this role's deadlines; the loop gives it its own (``use_clock``).
    clock: Callable[[], float] = time.monotonic

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Keep time on ``clock``: the loop's, which stands still while the broker cannot take our
        messages, and gives ``start``, ``tick`` and ``waits`` their ``now``."""
        self.clock = clock

    @abstractmethod
    def inbound(self) -> list[Inbound]:
        """The queues this role consumes (the loop declares nothing from this; it consumes)."""

    @abstractmethod
    def handle(self, inc: Incoming) -> Step:
        """Handle one message addressed to this role.

        Raises:
            RejectedMessage: the message is bad; the loop dead-letters it with the reason.
            PartyExit: the party cannot go on (a peer refused us, sent a NaN gradient, ...).
        """

    def start(self, now: float) -> Step:
        """Called once the transport is up and the checkpoint (if any) is loaded."""
        return Step()

    def tick(self, now: float) -> Step:
        """Called between messages: send what is due, act on role-owned deadlines."""
        return Step()

    def waits(self, now: float) -> list[Wait]:
        """What this role is waiting for now (the loop logs them and enforces their deadlines)."""
        return []

    def finished(self) -> PartyExit | None:
        """Non-None once this role's work is done (the loop then exits with it)."""
        return None

    def on_unroutable(self, send: Send, now: float) -> Step:
        """A send marked ``IfUnroutable.TELL`` found no queue."""
        return Step()

    def state(self) -> dict[str, Any]:
        """Everything to checkpoint (weights_only-loadable values)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore from ``state()``'s output."""

    def summary(self) -> dict[str, Any]:
        """What this role reports at the end of the run."""
        return {}


def batch_key(inc: Incoming) -> tuple[str, int] | None:
    """The training batch a message applies, if it is one: ``(client, seq)`` (the ledger's key)."""
    msg = inc.msg
    if isinstance(msg, wire.Forward) and msg.train and inc.source is Source.FORWARD:
        return msg.client_id, msg.seq
    if isinstance(msg, wire.Backward) and inc.source is Source.REPLY and msg.outcome == wire.Outcome.APPLIED.value:
        return msg.client_id, msg.seq
    return None


def routing(roles: Sequence[Role]) -> tuple[dict[str, Inbound], dict[tuple[str, wire.Kind], Role]]:
    """The queues a party consumes (one consumer per queue, even when roles share it) and which
    role takes each kind of message on each."""
    inbound: dict[str, Inbound] = {}
    routes: dict[tuple[str, wire.Kind], Role] = {}
    for role in roles:
        for i in role.inbound():
            known = inbound.get(i.queue)
            inbound[i.queue] = known.merge(i) if known is not None else i
            for kind in i.kinds:
                routes[(i.queue, kind)] = role
    return inbound, routes
