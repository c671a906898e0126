"""What a party sends, and what becomes of it.

The loop hands every ``Send`` of a role's ``Step`` here. The broker's answer comes back on the
transport's thread: a send nobody could route is sent again later (``IfUnroutable.RETRY``:
nobody consumes there yet) or handed back to the roles (``TELL``); a nack that outlived the
transport's own re-publishing ends the party. What a confirmation leaves for the loop is read
on the loop's thread (``resend_due``, ``take_told``, ``check``). Dead letters go out here too:
the message set aside with its reason, and the sender told why.
"""
from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future
from typing import Callable

from splitmq.shared import codec, defaults, topology, wire
from splitmq.shared.errors import PublishNacked, Unroutable
from splitmq.shared.transport import Delivery, Transport
from splitmq.workers import coalesce
from splitmq.workers.exits import ExitReason, PartyExit
from splitmq.workers.roles.base import IfUnroutable, Incoming, Send, ToParty, ToStage
from splitmq.workers.stats import Stats

log = logging.getLogger(__name__)

#: Answers a transient job's broker may lose: the owner's re-send of the batch brings them again.
_RESENT_ANSWERS = frozenset({wire.Outcome.APPLIED.value, wire.Outcome.DUPLICATE.value})


def resent_if_lost(send: Send) -> bool:
    """A training batch, or its answer: what ``delivery = transient`` keeps only in the broker's memory
    (the owner sends an unanswered batch again; the trainer answers again from ``answers.Answers``)."""
    msg = send.msg
    return (isinstance(msg, wire.Forward) and msg.train) or (
        isinstance(msg, wire.Backward) and msg.outcome in _RESENT_ANSWERS)


class Outbox:
    """Publishes a party's messages and keeps what their confirmations say."""

    def __init__(self, transport: Transport, cut_codec: codec.CutCodec, *, name: str, job_id: str,
                 user_id: str | None, stats: Stats, clock: Callable[[], float], coalesce: int = 1,
                 transient: bool = False) -> None:
        self.transport, self.codec, self.name, self.job_id, self.user_id = transport, cut_codec, name, job_id, user_id
        self.stats, self.clock, self.coalesce = stats, clock, coalesce
        self.transient = transient  # delivery = transient: training batches and answers published non-persistent
        self._kept: list[tuple[Send, Future[None]]] = []  # packable sends until ``flush`` (coalesce > 1)
        self.published: list[Future[None]] = []   # every publish not yet confirmed (flushed at exit)
        self._resends: list[tuple[float, Send]] = []
        self._told: list[Send] = []               # TELL sends that found no queue (pika thread appends)
        self._nacked: PublishNacked | None = None  # a publish the broker refused for good

    def publish(self, send: Send) -> Future[None]:
        """Publish ``send``; with ``coalesce`` > 1 a forward or backward is kept for ``flush`` (its future
        settles with the confirmation of the message that carries it), and anything else flushes first."""
        if self.coalesce > 1:
            if coalesce.packable(send):
                kept: Future[None] = Future()
                self._kept.append((send, kept))
                return kept
            self.flush()
        return self._publish(send)

    def flush(self) -> None:
        """Publish the kept sends, up to ``coalesce`` going to the same place in one message."""
        kept, self._kept = self._kept, []
        for run in coalesce.groups(kept, self.coalesce):
            sends = [s for s, _ in run]
            if len(run) == 1:
                coalesce.link(self._publish(sends[0]), [run[0][1]])
                continue
            parts = [self.codec.outgoing(s.msg) for s in sends]  # the codec per part, per tensor
            bundle = coalesce.pack(self.job_id, sends, [m.encode() for m in parts])
            real = self._publish(bundle, body=bundle.msg.encode(),
                                 cut_samples=sum(codec.cut_samples(m) for m in parts), parts=sends)
            coalesce.link(real, [f for _, f in run])

    def _publish(self, send: Send, *, body: bytes | None = None, cut_samples: int | None = None,
                 parts: list[Send] | None = None) -> Future[None]:
        if isinstance(send.route, ToStage):
            exchange = topology.activations_exchange(self.job_id)
            key = topology.forward_routing_key(self.name, send.route.dest)
        else:
            exchange = topology.gradients_exchange(self.job_id)
            key = topology.reply_routing_key(send.route.party)
        if body is None:
            msg = self.codec.outgoing(send.msg)  # the codec hook: the cut tensor as the job agreed it travels
            body, cut_samples = msg.encode(), codec.cut_samples(msg)
        self.stats.sent(len(body), cut_samples=cut_samples or 0)
        persistent = not (self.transient and all(resent_if_lost(s) for s in parts or [send]))
        future = self.transport.publish(exchange, key, body, message_id=send.message_id or send.correlation_id,
                                        correlation_id=send.correlation_id, reply_to=self.name, user_id=self.user_id,
                                        persistent=persistent)
        for one in parts or [send]:  # a bundle refused is each of its parts refused
            future.add_done_callback(functools.partial(self._on_confirm, send=one))
        self.published = [f for f in self.published if not f.done()]
        self.published.append(future)
        return future

    def dead_letter(self, delivery: Delivery, reason: str, detail: str, inc: Incoming | None, *,
                    tell_sender: bool) -> list[Future[None]]:
        """Set a message aside in the job's dead-letter queue with its reason; tell its sender why
        (``tell_sender``: it came on a forward queue, where senders wait for an answer)."""
        log.warning("%s: dead-lettering %s from %s: %s: %s", self.name, delivery.message_id,
                    delivery.user_id or delivery.routing_key, reason, detail)
        self.stats.rejected(reason)
        futures = [self.transport.publish(
            topology.dead_letter_exchange(self.job_id), "", delivery.body,
            message_id=topology.dead_letter_id(delivery.message_id or "", time.time_ns()),
            headers={"x-splitmq-reason": reason, "x-splitmq-detail": detail[:500],
                     "x-splitmq-queue": delivery.queue, "x-splitmq-party": self.name,
                     "x-splitmq-user": delivery.user_id or "", "x-splitmq-message-id": delivery.message_id or ""})]
        sender = delivery.reply_to or ""
        if tell_sender and _routable(sender):
            refusal = wire.Backward(job_id=self.job_id, client_id=inc.msg.client_id if inc is not None else sender,
                                    seq=inc.msg.seq if inc is not None else -1, outcome=wire.Outcome.REFUSED.value,
                                    error=f"{reason}: {detail}"[:1000])
            futures.append(self.publish(Send(ToParty(sender), refusal,
                                             delivery.correlation_id or delivery.message_id or "")))
        return futures

    def resend_due(self, now: float) -> None:
        """Send again what found no consumer a while ago (``IfUnroutable.RETRY``)."""
        due, self._resends = [s for t, s in self._resends if t <= now], [(t, s) for t, s in self._resends if t > now]
        for send in due:
            self.publish(send)

    def take_told(self) -> list[Send]:
        """The ``TELL`` sends that found no queue since the last call (for the roles to decide)."""
        told, self._told = list(self._told), []
        return told

    def check(self) -> None:
        """Raises:
            PartyExit: the broker refused a message for good (past the transport's re-publishing)."""
        if self._nacked is not None:
            raise PartyExit(ExitReason.BROKER_UNAVAILABLE, f"the broker refused a message for good: {self._nacked}")

    def _on_confirm(self, future: Future[None], send: Send) -> None:
        """On the transport's thread: a refused publish is logged and, if asked, retried."""
        exc = future.exception()
        if exc is None:
            return
        if isinstance(exc, Unroutable) and send.if_unroutable is IfUnroutable.RETRY:
            log.info("%s: nobody consumes %s yet; sending it again in %.0fs", self.name, send.route,
                     defaults.JOIN_RETRY_S)
            self._resends.append((self.clock() + defaults.JOIN_RETRY_S, send))
        elif isinstance(exc, Unroutable) and send.if_unroutable is IfUnroutable.TELL:
            self._told.append(send)
        else:
            log.warning("%s: %s for %s was not delivered: %s", self.name, send.msg.kind.value, send.route, exc)
            if isinstance(exc, PublishNacked):
                self._nacked = exc


def _routable(name: str) -> bool:
    try:
        topology.check_name("client", name)
    except ValueError:
        return False
    return True
