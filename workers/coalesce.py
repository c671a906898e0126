"""Coalescing (``coalesce`` > 1): several batches in one message, each still handled on its own.

**Out.** With ``coalesce`` = N the outbox keeps the forwards and backwards a loop pass produces
and, at the end of the pass, ``pack``s those going to the same place into ``wire.Bundle``s of
at most N (a lone one travels as itself, byte for byte as with N = 1). Each part is encoded
on its own, so the codec at the cut still applies per tensor. Every ``Send`` gets a future of
its own that settles with its bundle's confirmation (``link``).

**In.** The gate turns a bundle into one delivery per part (``gate.admit_all``); the loop
dedupes, dispatches and finishes each part exactly like a message that came alone, so a
redelivered bundle applies only the parts not applied before. ``Parts`` acks the bundle's
own delivery once every one of its parts is settled (applied and, when durable, checkpointed).
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterable, Sequence

from splitmq.shared import wire
from splitmq.shared.transport import Delivery
from splitmq.workers.roles.base import Send


def packable(send: Send) -> bool:
    """Forwards and their answers travel in bundles; hellos, weights and the rest alone."""
    return isinstance(send.msg, (wire.Forward, wire.Backward))


def groups(kept: Sequence[tuple[Send, Future[None]]], most: int) -> list[list[tuple[Send, Future[None]]]]:
    """Kept sends (each with its future) in runs of at most ``most`` going to the same place, in order per place."""
    by_place: dict[tuple[object, str], list[list[tuple[Send, Future[None]]]]] = {}
    for item in kept:
        runs = by_place.setdefault((item[0].route, item[0].if_unroutable.value), [[]])
        if len(runs[-1]) >= most:
            runs.append([])
        runs[-1].append(item)
    return [run for runs in by_place.values() for run in runs]


def pack(job_id: str, run: Sequence[Send], bodies: Sequence[bytes]) -> Send:
    """One ``Send`` carrying ``run`` (already encoded as ``bodies``) as a bundle."""
    first = run[0]
    msg = wire.Bundle(job_id=job_id, client_id=first.msg.client_id, seq=first.msg.seq,
                      parts=tuple((s.correlation_id, body) for s, body in zip(run, bodies)))
    # a message id of its own: the transport tells returned (unroutable) publishes apart by it
    return Send(first.route, msg, first.correlation_id, message_id=f"{first.correlation_id}+{len(run) - 1}",
                if_unroutable=first.if_unroutable)


def link(real: Future[None], each: Iterable[Future[None]]) -> None:
    """Settle every part's future with its bundle's confirmation."""
    waiting = list(each)

    def settle(f: Future[None]) -> None:
        exc = f.exception()
        for w in waiting:
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)
    real.add_done_callback(settle)


@dataclass
class _Whole:
    delivery: Delivery
    left: int


class Parts:
    """The parts of bundles not yet settled, each pointing at its bundle's delivery."""

    def __init__(self) -> None:
        self._of: dict[int, tuple[Delivery, _Whole]] = {}  # id(part) -> (part, its bundle); keeps the part alive

    def track(self, whole: Delivery, parts: Sequence[Delivery]) -> None:
        if len(parts) == 1 and parts[0] is whole:
            return
        group = _Whole(whole, len(parts))
        for part in parts:
            self._of[id(part)] = (part, group)

    def whole(self, part: Delivery) -> Delivery:
        """The broker's delivery ``part`` came in: its bundle's, or itself."""
        entry = self._of.get(id(part))
        return part if entry is None else entry[1].delivery

    def settled(self, deliveries: Iterable[Delivery]) -> list[Delivery]:
        """Of these settled deliveries, the broker's deliveries to ack now (a bundle once all its parts are)."""
        out: list[Delivery] = []
        for d in deliveries:
            entry = self._of.pop(id(d), None)
            if entry is None:
                out.append(d)
                continue
            group = entry[1]
            group.left -= 1
            if group.left == 0:
                out.append(group.delivery)
        return out

    def __len__(self) -> int:
        return len(self._of)
