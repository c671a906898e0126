"""Durable checkpoints: standard PyTorch files written atomically, loaded with weights_only.

A checkpoint is one ``torch.save`` of a dict of tensors and plain values: the segment's
``state_dict``, the optimizer state, the step, the job config and the party's bookkeeping
(e.g. last applied sequence numbers). It is written to a temporary file, fsynced, and
renamed over the old one, so a crash leaves either the old or the new checkpoint, whole.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def path_for(directory: str | Path, party: str) -> Path:
    return Path(directory) / f"{party}.pt"


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``state`` (fsync of file and directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none. Never runs code from the file."""
    path = Path(path)
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
