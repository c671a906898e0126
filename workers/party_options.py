"""What a party loop is told at start (``LoopOptions``) and what it reports at its end (``Outcome``).

Builders (``worker.build``, ``server.build``, ...) fill the one; callers of ``Party.run`` read the
other; the loop itself is ``workers.party``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from splitmq.shared import defaults, topology
from splitmq.workers import gate
from splitmq.workers.exits import ExitReason


@dataclass(frozen=True)
class LoopOptions:
    """How one party runs. ``name`` is its routing-key sender and reply address."""

    name: str
    job_id: str
    spec: dict[str, Any] = field(default_factory=dict)   # what a checkpoint must agree with
    checkpoint_path: Path | None = None
    checkpoint_every: int = 32
    user_id: str | None = None
    rules: gate.GateRules | None = None
    layout: topology.Layout | None = None                # declared at start when permitted
    broker_timeout_s: float = defaults.BROKER_TIMEOUT_S
    lease_timeout_s: float = defaults.LEASE_TIMEOUT_S
    #: The role whose summary is the party's (the others' go under their names).
    primary: str = ""
    #: Wait without a deadline while another party holds our name, then take over (a standby trainer).
    standby: bool = False
    #: What to tell the user when our name stays taken (the trainer names its standby and sharded modes).
    in_use_hint: str = ""
    #: Called once as the party ends, after its final checkpoint (keeps the trained segments).
    on_exit: Callable[[ExitReason], None] | None = None


@dataclass
class Outcome:
    """How a party ended, with every role's summary."""

    reason: ExitReason
    detail: str
    summary: dict[str, Any]
