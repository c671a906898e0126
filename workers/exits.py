"""Why a party stops, and what it is waiting for.

A party's loop ends only through a ``PartyExit`` with an ``ExitReason``; each reason has a
documented process exit code (docs/cli.md). A ``Wait`` is something a party is waiting for:
the loop logs it once it is ``WAIT_LOG_S`` old and again at that interval, and when its
deadline passes either ends the party with the wait's reason or, for a wait a role resolves
itself (a round closing without absent owners), leaves it to the role.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum

from splitmq.shared import defaults

log = logging.getLogger(__name__)


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


@dataclass
class WaitLog:
    """Watches a party's waits: logs each once it is ``WAIT_LOG_S`` old and again at that
    interval (what, since when, how long of how long), and ends the party when a wait with an
    ``expire`` reason is overdue."""

    party: str
    _logged: dict[str, float] = field(default_factory=dict)  # what -> when last logged

    def watch(self, waits: list[Wait], now: float) -> None:
        """Raises:
            PartyExit: a wait's deadline passed, with its reason and hint."""
        current = {w.what for w in waits}
        self._logged = {k: v for k, v in self._logged.items() if k in current}
        for w in waits:
            age = now - w.since
            if w.overdue(now) and w.expire is not None:
                raise PartyExit(w.expire, f"gave up after {w.deadline_s:g}s waiting for {w.what}"
                                + (f": {w.hint}" if w.hint else ""))
            if age >= defaults.WAIT_LOG_S and now - self._logged.get(w.what, 0.0) >= defaults.WAIT_LOG_S:
                started = time.strftime("%H:%M:%S", time.localtime(time.time() - age))
                log.info("%s: waiting for %s since %s (%.0fs of %.0fs)", self.party, w.what, started, age,
                         w.deadline_s)
                self._logged[w.what] = now


@dataclass
class Outages:
    """When the broker could not take our messages: connection lost, or publishes blocked by a
    resource alarm. That is the one wait while it lasts (with the broker's deadline and exit),
    and it stops the roles' clock (``service``): a peer cannot answer what never reached it, and
    no role deadline (a wait on a peer, a vertical batch's other parts, an averaging round, a
    resend) counts the broker's outage against it (``peer_silent``, a skipped batch)."""

    timeout_s: float
    _since: float | None = None
    _ended_s: float = 0.0  # the length of every outage that ended

    def waits(self, problem: str | None, hint: str, now: float) -> list[Wait]:
        """The broker's wait while there is a ``problem`` ("the broker to ..."), else none."""
        if problem is None:
            if self._since is not None:
                self._ended_s += now - self._since
                self._since = None
            return []
        self._since = now if self._since is None else self._since
        return [Wait(problem, self._since, self.timeout_s, ExitReason.BROKER_UNAVAILABLE, hint)]

    def service(self, now: float) -> float:
        """``now`` on the roles' clock: time less every outage so far (it stands still during one)."""
        return (now if self._since is None else self._since) - self._ended_s
