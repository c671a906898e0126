"""Why a party stops, and what it is waiting for.

A party's loop ends only through a ``PartyExit`` with an ``ExitReason``; each reason has a
documented process exit code (docs/cli.md). A ``Wait`` is something a party is waiting for:
the loop logs it once it is ``WAIT_LOG_S`` old and again at that interval, and when its
deadline passes either ends the party with the wait's reason or, for a wait a role resolves
itself (a round closing without absent owners), leaves it to the role.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ExitReason(str, Enum):
    """A named way for a party to end. The value is what logs and summaries say."""

    DONE = "done"                          # the job (this party's part of it) is finished
    INTERRUPTED = "interrupted"            # SIGTERM / SIGINT: finished the current message, checkpointed
    CONFIG = "config"                      # this party's configuration or state cannot work (message says why)
    BROKER_UNAVAILABLE = "broker_unavailable"  # no broker within the deadline, or it refused us for good
    NAME_IN_USE = "name_in_use"            # another party of this name is running for this job
    PEER_REFUSED = "peer_refused"          # a peer refused our batch or our join, and said why
    PEER_SILENT = "peer_silent"            # a peer did not answer within the deadline
    PEER_FAULT = "peer_fault"              # a peer sent something we cannot use (e.g. a NaN gradient)
    STATE_MISMATCH = "state_mismatch"      # our state is older than what we acknowledged (wrong checkpoint)
    IDLE = "idle"                          # a trainer heard nothing for its idle deadline, with owners unfinished
    COLLAPSED = "collapsed"                # the cut activations stopped varying (NoPeek too strong): nothing to learn
    FAILED = "failed"                      # an unexpected error (a bug): see the traceback in the log

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self]


#: Process exit codes (sysexits where one fits): 0 done, 1 failed, 2 usage (argparse),
#: 3 configuration, 65 training collapsed (a setting to change), 69 broker unavailable, 75 a peer
#: problem worth retrying later, 130 interrupted.
EXIT_CODES: dict[ExitReason, int] = {
    ExitReason.DONE: 0,
    ExitReason.INTERRUPTED: 130,
    ExitReason.CONFIG: 3,
    ExitReason.BROKER_UNAVAILABLE: 69,
    ExitReason.NAME_IN_USE: 3,
    ExitReason.PEER_REFUSED: 1,
    ExitReason.PEER_SILENT: 75,
    ExitReason.PEER_FAULT: 1,
    ExitReason.STATE_MISMATCH: 3,
    ExitReason.IDLE: 75,
    ExitReason.COLLAPSED: 65,
    ExitReason.FAILED: 1,
}


class PartyExit(Exception):
    """Raised (by a role or the loop) to end the party for a named reason.

    ``reject_reason``: the message being handled is also dead-lettered with this reason
    (a peer's message we cannot use, which is why we stop).
    """

    def __init__(self, reason: ExitReason, detail: str, *, reject_reason: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.reject_reason = reject_reason


@dataclass(frozen=True)
class Wait:
    """Something a party is waiting for, since when, for how long, and how it ends.

    ``expire`` None means the role acts on the deadline itself (the loop only logs the wait).
    ``hint`` is appended to the exit message: what the user can do about it.
    """

    what: str
    since: float
    deadline_s: float
    expire: ExitReason | None = ExitReason.PEER_SILENT
    hint: str = ""

    def overdue(self, now: float) -> bool:
        return now - self.since > self.deadline_s
