"""What a party's checkpoint holds: the job's settings, and each role's state and ledger.

The loop decides when to checkpoint (after the replies it covers are confirmed, before the acks
it covers); this module is what goes in and comes back out, kept apart from that timing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from splitmq.shared import checkpoint
from splitmq.shared.config import differences
from splitmq.workers.exits import ExitReason, PartyExit
from splitmq.workers.roles.base import Role


def save(path: Path, spec: dict[str, Any], roles: Sequence[Role]) -> None:
    """Write every role's state and ledger, with the job settings they belong to."""
    checkpoint.save(path, {"config": spec, "roles": {
        r.name: {"role": r.state(), "ledger": r.ledger.state() if r.ledger is not None else {}} for r in roles}})


def restore(path: Path, spec: dict[str, Any], roles: Sequence[Role]) -> bool:
    """Load every role's state and ledger from ``path``; False when there is no checkpoint yet.

    Raises:
        PartyExit: ``config``: the checkpoint was written for other job settings.
    """
    state = checkpoint.load(path)
    if state is None:
        return False
    diffs = differences(spec, state["config"])
    if diffs:
        raise PartyExit(ExitReason.CONFIG, f"checkpoint {path} was written for another job: " + "; ".join(diffs)
                        + " (use another --checkpoint-dir, or the job's own settings)")
    for role in roles:
        saved = state["roles"].get(role.name, {})
        if role.ledger is not None:
            role.ledger.load_state(saved.get("ledger", {}))
        role.load_state(saved.get("role", {}))
    return True
