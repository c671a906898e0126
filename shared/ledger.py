"""Which training batches have been applied: per client, a prefix plus the set above it.

Exactly-once rests on this record: a batch ``(client, seq)`` is applied only if it is not
here. A high-water mark alone is not enough: with several batches in flight, batch 3 can be
applied before a retried batch 2, which must then still be applied, not taken for a repeat.
The record stays small: everything up to ``prefix`` is applied, and only the batches applied
out of order above it are kept one by one. Pure bookkeeping: no broker, no torch.
"""
from __future__ import annotations

from typing import Any, Iterator

#: How far above a client's applied prefix a batch may be (a wild jump is refused).
MAX_SEQ_JUMP = 4096


class Ledger:
    """Applied batches of each client."""

    def __init__(self) -> None:
        self._prefix: dict[str, int] = {}
        self._above: dict[str, set[int]] = {}

    def applied(self, client: str, seq: int) -> bool:
        """Whether batch ``seq`` of ``client`` has been applied."""
        return seq <= self._prefix.get(client, -1) or seq in self._above.get(client, ())

    def add(self, client: str, seq: int) -> None:
        """Record batch ``seq`` of ``client`` as applied (idempotent)."""
        prefix = self._prefix.get(client, -1)
        if seq <= prefix:
            return
        above = self._above.setdefault(client, set())
        above.add(seq)
        while prefix + 1 in above:
            prefix += 1
            above.remove(prefix)
        self._prefix[client] = prefix

    def prefix(self, client: str) -> int:
        """The last ``seq`` such that every batch up to it is applied (-1 if batch 0 is not)."""
        return self._prefix.get(client, -1)

    def above(self, client: str) -> list[int]:
        """Batches applied out of order, beyond the prefix."""
        return sorted(self._above.get(client, ()))

    def count(self, client: str) -> int:
        """How many batches of ``client`` are applied."""
        return self.prefix(client) + 1 + len(self._above.get(client, ()))

    def plausible(self, client: str, seq: int) -> bool:
        """A new batch number is not negative and not absurdly far ahead of what was applied."""
        return 0 <= seq <= self.prefix(client) + MAX_SEQ_JUMP

    def unapplied(self, client: str, start: int = 0) -> Iterator[int]:
        """Batch numbers from ``start`` upward that are not applied (an endless iterator)."""
        seq = max(start, self.prefix(client) + 1)
        above = self._above.get(client, set())
        while True:
            if seq not in above:
                yield seq
            seq += 1

    def clients(self) -> list[str]:
        return sorted(set(self._prefix) | set(self._above))

    def state(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {c: {"prefix": self.prefix(c), "above": self.above(c)} for c in self.clients()}

    def load_state(self, state: dict[str, Any]) -> None:
        self._prefix = {c: int(v["prefix"]) for c, v in state.items()}
        self._above = {c: {int(s) for s in v["above"]} for c, v in state.items() if v["above"]}
