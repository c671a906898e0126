"""Consent to export: each segment holder's own record of whom it lets assemble the whole model.

"All segment holders must consent in order to aggregate the model at the end of training."
An approval names the requester and the job, is given on the holder's side
(``splitmq approve-export``), and lives in a small JSON file under the holder's run (or
checkpoint) directory: never on the broker, never written by a peer. A holder's serving
process reads the file at each export request, so an approval (or a revocation) takes effect
at once. ``splitmq approve-export`` needs no model: this module does not import torch.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from splitmq.shared import topology


def path_for(directory: str | Path, holder: str) -> Path:
    """The consent file of ``holder`` in its run (or checkpoint) directory."""
    return Path(directory) / f"consent-{topology.check_name('client', holder)}.json"


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ValueError(f"consent file {path} is unreadable ({exc}); fix or remove it") from None
    approvals = record.get("approvals") if isinstance(record, dict) else None
    if not isinstance(approvals, list):
        raise ValueError(f"consent file {path} has no 'approvals' list; fix or remove it")
    return [a for a in approvals if isinstance(a, dict)]


def _write(path: Path, holder: str, approvals: list[dict[str, Any]]) -> None:
    """Atomically replace the file (a serving process may read it at any moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"holder": holder, "approvals": approvals}, indent=1) + "\n")
    os.replace(tmp, path)


def approve(path: Path, *, holder: str, job_id: str, requester: str) -> None:
    """Record that ``holder`` lets ``requester`` export job ``job_id``'s model (idempotent)."""
    topology.check_name("job", job_id)
    topology.check_name("client", requester)
    approvals = [a for a in _read(path) if (a.get("job_id"), a.get("requester")) != (job_id, requester)]
    approvals.append({"job_id": job_id, "requester": requester, "approved_at": time.time()})
    _write(path, holder, approvals)


def revoke(path: Path, *, holder: str, job_id: str, requester: str) -> bool:
    """Withdraw an approval; True if there was one."""
    before = _read(path)
    after = [a for a in before if (a.get("job_id"), a.get("requester")) != (job_id, requester)]
    _write(path, holder, after)
    return len(after) != len(before)


def approved(path: Path, *, job_id: str, requester: str) -> bool:
    """Whether this holder approved an export of ``job_id`` to ``requester``."""
    return any(a.get("job_id") == job_id and a.get("requester") == requester for a in _read(path))


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("approve-export", help="as a segment holder, let a requester export the job's whole model")
    p.add_argument("--job-id", required=True, help="the job whose model may be exported")
    p.add_argument("--holder", required=True, help="this party's name (a stage, or a data owner like client-0)")
    p.add_argument("--requester", required=True, help="the party allowed to assemble and keep the whole model")
    p.add_argument("--run-dir", help="this holder's run directory, where its consent file lives (default runs/<job>)")
    p.add_argument("--revoke", action="store_true", help="withdraw the approval instead")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    path = path_for(args.run_dir or f"runs/{args.job_id}", args.holder)
    if args.revoke:
        had = revoke(path, holder=args.holder, job_id=args.job_id, requester=args.requester)
        print(f"{args.holder}: {'revoked' if had else 'there was no'} approval of {args.requester} exporting job "
              f"{args.job_id} ({path})")
        return 0
    approve(path, holder=args.holder, job_id=args.job_id, requester=args.requester)
    print(f"{args.holder}: {args.requester} may export job {args.job_id}'s model ({path})")
    return 0
