"""What a data owner waits for, and for how long.

Its batches in flight (each waits for its answer, ``peer_s``), requests awaiting an answer
(hello, a sync round, a turn, an evaluation), and gradients of batches the trainer applied
before (they must be in our reply queue; if they do not come within ``duplicate_s``, our state
is older than what we acknowledged). The bottom role keeps these; ``waits`` turns them into
the loop's ``Wait``s, each with its deadline and named exit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from splitmq.shared import defaults, wire
from splitmq.workers.exits import ExitReason, Wait


@dataclass(frozen=True)
class OwnerTimeouts:
    peer_s: float = defaults.PEER_TIMEOUT_S
    join_s: float = defaults.JOIN_TIMEOUT_S
    resend_after_s: float = defaults.RESEND_AFTER_S
    duplicate_s: float = defaults.DUPLICATE_WAIT_S
    turn_s: float = defaults.TURN_TIMEOUT_S


@dataclass
class InFlight:
    """A batch sent and not yet answered."""

    msg: wire.Forward
    first_sent: float
    last_sent: float
    duplicate_at: float | None = None   # when the trainer said it applied this batch before


@dataclass
class Request:
    """Something asked of a peer that must be answered within ``deadline_s``."""

    what: str
    since: float
    deadline_s: float


#: Appended to a state-mismatch exit: how an owner's state gets older than what it acknowledged.
STATE_HINT = ("this worker's state is older than the gradients it acknowledged: it ran before without "
              "--checkpoint-dir, or with another one. Restore that directory, or start the job afresh under a "
              "new --job-id")


#: The same exit in a ``delivery = transient`` job, where a second cause is likelier than the first.
TRANSIENT_STATE_HINT = ("delivery = transient: the broker lost this batch's answer while the trainer restarted "
                        "(it keeps answers in memory only; docs/guarantees.md); or " + STATE_HINT[0].lower()
                        + STATE_HINT[1:] + "; delivery = durable rules out the first")


def waits(requests: Iterable[Request], in_flight: Iterable[InFlight], *, dest: str, timeouts: OwnerTimeouts,
          hint: str, now: float, state_hint: str = STATE_HINT) -> list[Wait]:
    """The owner's waits on ``dest``: each request, the oldest batch in flight, the oldest repeat."""
    batches = list(in_flight)
    out = [Wait(r.what, r.since, r.deadline_s, ExitReason.PEER_SILENT, hint) for r in requests]
    if batches:
        oldest = min(batches, key=lambda b: b.first_sent)
        out.append(Wait(f"the answer to batch {oldest.msg.seq} from {dest}", oldest.first_sent, timeouts.peer_s,
                        ExitReason.PEER_SILENT, hint))
    repeats = [b for b in batches if b.duplicate_at is not None]
    if repeats:
        b = min(repeats, key=lambda d: d.duplicate_at or 0.0)
        out.append(Wait(f"the gradient of batch {b.msg.seq}, which {dest} applied before (it must be in our reply "
                        "queue)", b.duplicate_at or now, timeouts.duplicate_s, ExitReason.STATE_MISMATCH, state_hint))
    return out
