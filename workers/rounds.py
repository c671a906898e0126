"""Bottom-weight exchange between data owners, brokered by the trainer.

``average`` (SplitFed): after every ``sync_every`` epochs each owner sends its bottom; once
all ``num_clients`` have (or ``timeout_s`` after the first did), the sample-weighted average
goes back to each of them. ``handoff`` (the original SplitNN): owners take turns; owner i
trains its epoch, then its bottom is relayed to owner i+1, who starts from it.
Pure bookkeeping: the trainer publishes what these methods return.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from splitmq.shared import aggregate

#: A round closes with whoever reported once it is this old (absent owners catch up later).
SYNC_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Send:
    """Publish ``tensors`` (as a Weights message for ``epoch``) to ``client`` under ``correlation_id``."""

    client: str
    reply_to: str
    correlation_id: str
    epoch: int
    tensors: dict[str, torch.Tensor]


class BottomRounds:
    def __init__(self, *, mode: str, num_clients: int, epochs: int, timeout_s: float = SYNC_TIMEOUT_S) -> None:
        if mode not in ("average", "handoff"):
            raise ValueError(f"mode must be average or handoff, got {mode!r}")
        self.mode, self.num_clients, self.epochs, self.timeout_s = mode, num_clients, epochs, timeout_s
        self.open: dict[int, dict[str, dict[str, Any]]] = {}
        self.started: dict[int, float] = {}
        self.results: dict[int, dict[str, torch.Tensor]] = {}

    def contribute(self, *, epoch: int, client: str, reply_to: str, correlation_id: str,
                   tensors: dict[str, torch.Tensor], num_samples: int) -> list[Send]:
        if self.mode == "handoff":
            return self._handoff(epoch, client, tensors)
        if epoch in self.results:  # late or repeated: the round is closed, hand out its result
            return [Send(client, reply_to, correlation_id, epoch, self.results[epoch])]
        entries = self.open.setdefault(epoch, {})
        self.started.setdefault(epoch, time.monotonic())
        entries[client] = {"tensors": {k: v.clone() for k, v in tensors.items()}, "n": max(1, num_samples),
                           "reply_to": reply_to, "cid": correlation_id}
        return self.close(epoch) if len(entries) >= self.num_clients else []

    def close(self, epoch: int) -> list[Send]:
        entries = self.open.pop(epoch)
        self.started.pop(epoch, None)
        self.results[epoch] = aggregate.weighted_average([e["tensors"] for e in entries.values()],
                                                         [e["n"] for e in entries.values()])
        for old in [e for e in self.results if e < epoch - 1]:
            del self.results[old]
        return [Send(c, e["reply_to"], e["cid"], epoch, self.results[epoch]) for c, e in entries.items()]

    def overdue(self, now: float | None = None) -> list[int]:
        now = time.monotonic() if now is None else now
        return [e for e, since in self.started.items() if now - since > self.timeout_s]

    def _handoff(self, epoch: int, client: str, tensors: dict[str, torch.Tensor]) -> list[Send]:
        index = int(client.rsplit("-", 1)[-1])
        nxt = (index + 1) % self.num_clients
        next_epoch = epoch + 1 if nxt == 0 else epoch
        if next_epoch >= self.epochs:
            return []
        name = f"client-{nxt}"
        return [Send(name, name, f"{name}:handoff:{next_epoch}", next_epoch, tensors)]

    def state(self) -> dict[str, Any]:
        return {"open": self.open, "results": self.results}

    def load_state(self, state: dict[str, Any]) -> None:
        self.open = {int(k): v for k, v in state["open"].items()}
        self.results = {int(k): v for k, v in state["results"].items()}
        self.started = {e: time.monotonic() for e in self.open}
