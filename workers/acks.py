"""When a delivery may be acked: after its replies are confirmed and, if durable, checkpointed.

A handled delivery is ``Finishing`` until the broker has confirmed every message its
handling published; then it is acked at once (no checkpoint directory, or an effect that
needs none), or kept until the next checkpoint is on disk. A delivery a role holds (a
middle hop waiting for the next stage) is ``held`` under the role's key until settled.
A bundle's parts (``coalesce`` > 1) are settled one by one; the bundle's own delivery is ready
once every part is (``workers.coalesce.Parts``).
Nothing here talks to the broker: the loop asks what is ready and acks it.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Hashable

from splitmq.shared.transport import Delivery
from splitmq.workers.coalesce import Parts


@dataclass
class Finishing:
    delivery: Delivery
    futures: list[Future[None]] = field(default_factory=list)
    durable: bool = True

    def confirmed(self) -> bool:
        return all(f.done() for f in self.futures)


class Acks:
    """The deliveries a party has taken and not yet acked."""

    def __init__(self, *, checkpointing: bool) -> None:
        self.checkpointing = checkpointing
        self.held: dict[Hashable, Delivery] = {}
        self._finishing: list[Finishing] = []
        self._awaiting_checkpoint: list[Delivery] = []
        self._awaiting_wholes: set[int] = set()  # the broker's deliveries among them (a bundle once), by id
        self._parts = Parts()

    def split(self, whole: Delivery, parts: list[Delivery]) -> None:
        """``whole`` came as ``parts`` (a bundle): it is acked once every part is settled."""
        self._parts.track(whole, parts)

    def hold(self, key: Hashable, delivery: Delivery) -> None:
        self.held[key] = delivery

    def release(self, key: Hashable) -> Delivery | None:
        return self.held.pop(key, None)

    def finish(self, delivery: Delivery, futures: list[Future[None]], *, durable: bool) -> None:
        self._finishing.append(Finishing(delivery, futures, durable and self.checkpointing))

    def ready(self) -> list[Delivery]:
        """Deliveries whose replies are confirmed and that need no checkpoint: ack them now."""
        out, keep = [], []
        for f in self._finishing:
            if not f.confirmed():
                keep.append(f)
            elif f.durable:
                self._awaiting_checkpoint.append(f.delivery)
                self._awaiting_wholes.add(id(self._parts.whole(f.delivery)))
            else:
                out.append(f.delivery)
        self._finishing = keep
        return self._parts.settled(out)

    def unconfirmed(self) -> list[Future[None]]:
        """Publishes a checkpoint must see confirmed before it may cover their deliveries."""
        return [fut for f in self._finishing for fut in f.futures if not fut.done()]

    def checkpointed(self) -> list[Delivery]:
        """After a checkpoint: every durable delivery it covers, to ack (call ``ready`` first)."""
        out = self._awaiting_checkpoint + [f.delivery for f in self._finishing if f.durable and f.confirmed()]
        self._awaiting_checkpoint, self._awaiting_wholes = [], set()
        self._finishing = [f for f in self._finishing if not (f.durable and f.confirmed())]
        return self._parts.settled(out)

    @property
    def pending_checkpoint(self) -> int:
        """The broker's deliveries waiting for a checkpoint, a bundle once (the checkpoint rule counts these:
        ``checkpoint_every`` counts messages, as the broker holds them unacked)."""
        finishing = {id(self._parts.whole(f.delivery)) for f in self._finishing if f.durable}  # a few: unconfirmed
        return len(self._awaiting_wholes) + len(finishing - self._awaiting_wholes)

    def __len__(self) -> int:
        return len(self.held) + len(self._finishing) + len(self._awaiting_checkpoint)
