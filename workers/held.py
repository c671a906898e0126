"""Messages a party holds back to handle later: a failing handler's, and unknown owners' batches.

**Retries.** A handler that raised (not the sender's fault, as far as we can tell) gets the
message again in place after a jittered exponential backoff, never through a broker requeue
(which would reorder it behind later batches); after ``HANDLER_ATTEMPTS`` it is dead-lettered.

**Unjoined owners.** An owner is unknown when this party lost its state, or the owner never joined. Its batches are
never acked around: they are kept, unacknowledged, the owner is asked to join (once per
``JOIN_RETRY_S``, not per batch), they are handed back to their role once a second (the owner
may have joined since), and dead-lettered once held longer than ``JOIN_TIMEOUT_S``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from splitmq.shared import defaults
from splitmq.shared.transport import Delivery
from splitmq.workers.roles.base import Incoming

#: How often held batches are handed back to their role.
RECHECK_S = 1.0


@dataclass
class Retry:
    due: float
    attempt: int      # the attempt this will be
    inc: Incoming
    delivery: Delivery


@dataclass
class Retries:
    """Messages whose handler failed, each due again at its own time."""

    pending: list[Retry] = field(default_factory=list)

    def schedule(self, inc: Incoming, delivery: Delivery, failed_attempt: int, now: float) -> float:
        """Try again after the backoff for ``failed_attempt``; returns the delay."""
        backoff: float = defaults.RETRY_BASE_S * 2.0 ** (failed_attempt - 1)
        delay = min(defaults.RETRY_CAP_S, backoff) * random.uniform(0.5, 1.0)
        self.pending.append(Retry(now + delay, failed_attempt + 1, inc, delivery))
        return delay

    def due(self, now: float) -> list[Retry]:
        due, self.pending = [r for r in self.pending if r.due <= now], [r for r in self.pending if r.due > now]
        return due


class Unjoined:
    """The held batches, by owner, and when each owner was last asked to join."""

    def __init__(self) -> None:
        self.held: dict[str, list[tuple[float, Incoming, Delivery]]] = {}
        self.asked: dict[str, float] = {}
        self.checked = 0.0

    def hold(self, client: str, inc: Incoming, delivery: Delivery, now: float) -> bool:
        """Keep a batch; True when its owner should be asked to join now."""
        self.held.setdefault(client, []).append((now, inc, delivery))
        if now - self.asked.get(client, -1e9) < defaults.JOIN_RETRY_S:
            return False
        self.asked[client] = now
        return True

    def due(self, now: float) -> tuple[list[tuple[Incoming, Delivery]], list[tuple[Incoming, Delivery]]]:
        """Once a second, every held batch: (those to try again, those held too long)."""
        if now - self.checked < RECHECK_S or not self.held:
            return [], []
        self.checked = now
        held, self.held = self.held, {}
        entries = [e for batches in held.values() for e in batches]
        expired = [(inc, d) for since, inc, d in entries if now - since > defaults.JOIN_TIMEOUT_S]
        again = [(inc, d) for since, inc, d in entries if now - since <= defaults.JOIN_TIMEOUT_S]
        return again, expired
