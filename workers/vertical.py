"""Joining a vertically partitioned batch: each party sends its cut output for the same
samples; the top waits for all parts, or gives up on a batch after a timeout.

Pure bookkeeping (no broker, no torch ops beyond checks): the trainer feeds it messages and
acts on what it returns. Policy for a late or missing party (documented in
docs/configurations.md): wait ``timeout_s`` from the batch's first part, then skip the batch;
every party that did send gets a "skipped" answer and drops its stash; a part that arrives
after its batch closed gets the same answer at once.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from splitmq.shared.errors import RejectedMessage
from splitmq.shared.wire import Forward

#: Closed batch ids remembered, to answer late parts at once.
CLOSED_MEMORY = 4096


@dataclass
class PendingBatch:
    first_seen: float
    parts: dict[int, tuple[Forward, Any]] = field(default_factory=dict)  # part index -> (msg, delivery)


class VerticalJoin:
    """Collects the parts of each batch (keyed by seq) from ``parties`` in a fixed order."""

    def __init__(self, parties: Sequence[str], *, timeout_s: float) -> None:
        if len(parties) < 1 or len(set(parties)) != len(parties):
            raise ValueError(f"need distinct party names, got {list(parties)}")
        if timeout_s <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout_s}")
        self.index = {name: i for i, name in enumerate(parties)}
        self.timeout_s = timeout_s
        self.pending: dict[int, PendingBatch] = {}
        self.closed: collections.OrderedDict[int, str] = collections.OrderedDict()

    def add(self, msg: Forward, delivery: Any) -> list[tuple[Forward, Any]] | None:
        """Add one part; returns all parts in party order once the batch is complete.

        Raises:
            RejectedMessage: unknown party, or sample ids that differ from the other parts'.
        """
        if msg.client_id not in self.index:
            raise RejectedMessage("identity", f"{msg.client_id!r} is not a party of this vertical job")
        batch = self.pending.setdefault(msg.seq, PendingBatch(time.monotonic()))
        others = [m for m, _ in batch.parts.values()]
        if others and (msg.sample_ids is None or others[0].sample_ids is None
                       or not torch.equal(msg.sample_ids, others[0].sample_ids)):
            raise RejectedMessage("shape", f"batch {msg.seq}: sample ids differ between parties")
        batch.parts[self.index[msg.client_id]] = (msg, delivery)
        if len(batch.parts) < len(self.index):
            return None
        del self.pending[msg.seq]
        self._close(msg.seq, "joined")
        return [batch.parts[i] for i in range(len(self.index))]

    def was_closed(self, seq: int) -> str | None:
        """How batch ``seq`` ended ("joined" or "skipped"), if it has."""
        return self.closed.get(seq)

    def expired(self, now: float | None = None) -> list[tuple[int, list[tuple[Forward, Any]]]]:
        """Batches whose wait ran out: removed and returned with the parts that did arrive."""
        now = time.monotonic() if now is None else now
        out = []
        for seq, batch in list(self.pending.items()):
            if now - batch.first_seen > self.timeout_s:
                del self.pending[seq]
                self._close(seq, "skipped")
                out.append((seq, list(batch.parts.values())))
        return out

    def _close(self, seq: int, how: str) -> None:
        self.closed[seq] = how
        while len(self.closed) > CLOSED_MEMORY:
            self.closed.popitem(last=False)


def split_gradient(grad: torch.Tensor, widths: Sequence[int], combine: str) -> list[torch.Tensor]:
    """Each party's slice of the joined input's gradient (concat), or the whole of it (sum)."""
    if combine == "sum":
        return [grad for _ in widths]
    return list(grad.split(list(widths), dim=1))                     # (B, w_i) each


def join(parts: Sequence[torch.Tensor], combine: str) -> torch.Tensor:
    if combine == "sum":
        return torch.stack(list(parts)).sum(0)                       # (B, w)
    return torch.cat(list(parts), dim=1)                             # (B, sum w_i)
