"""Which broker address a connection tries next, and when a refused login is final.

A cluster gives every party several addresses. Each round tries every address once, in a fresh
random order (so a fleet of parties does not all land on one node), with the address just lost
tried last. A refused login is final only once every address has refused it since the
connection was last ready: a cluster node still booting may refuse users the others accept.
"""
from __future__ import annotations

import random
from typing import Generic, Sequence, TypeVar

A = TypeVar("A")


class Rotation(Generic[A]):
    """Addresses in shuffled rounds; ``current`` is the one being tried or used."""

    def __init__(self, addresses: Sequence[A]) -> None:
        if not addresses:
            raise ValueError("at least one broker address is needed")
        self.addresses = list(addresses)
        self.current = self.addresses[0]
        self._order: list[A] = []              # this round's addresses not yet tried (``pop`` takes the last)
        self._served_this_round = False
        self._refused: set[int] = set()        # ids of the addresses that refused our login since ready

    def next(self) -> A:
        """The address to try now (a new round when this one is spent)."""
        if not self._order:
            self.new_round(avoid=None)
        self.current = self._order.pop()
        return self.current

    def peek(self) -> A | None:
        """The next address of this round, or None when the round is spent (time to back off)."""
        return self._order[-1] if self._order else None

    def new_round(self, avoid: A | None) -> None:
        """Every address once, in a fresh random order; ``avoid`` last."""
        others = [a for a in self.addresses if a is not avoid]
        self._order = ([avoid] if avoid is not None else []) + random.sample(others, len(others))
        self._served_this_round = False

    def lost(self) -> None:
        """The connection we were serving on dropped: a new round, with its node tried last."""
        if self._served_this_round:
            self.new_round(avoid=self.current)

    def ready(self) -> None:
        """Connected and serving through ``current``: refusals start counting afresh."""
        self._served_this_round = True
        self._refused.clear()

    def login_refused(self) -> bool:
        """``current`` refused our login; True when that is final (every address refused since ready)."""
        self._refused.add(id(self.current))
        return len(self._refused) == len(self.addresses)
